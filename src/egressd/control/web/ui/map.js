// The world map: an SVG in an equirectangular projection (x = longitude, y = -latitude,
// in degrees), drawn from the data centers' coordinates over a low-detail land outline.
// No tiles, no network: it works offline. The view fits the PoPs (or the whole world).
// The map is a picture (role="img" with a text summary); the same facts are in the
// tables next to it, which is what keyboard and screen-reader users work with.

import { s } from "./dom.js";
import { LAND } from "./world.js";

const WORLD = { x: -180, y: -90, w: 360, h: 180 };

function fit(dataCenters, world) {
  if (world || dataCenters.length === 0) return { ...WORLD };
  const xs = dataCenters.map((dc) => dc.longitude);
  const ys = dataCenters.map((dc) => -dc.latitude);
  const minX = Math.min(...xs);
  const maxX = Math.max(...xs);
  const minY = Math.min(...ys);
  const maxY = Math.max(...ys);
  let w = Math.max(maxX - minX, 40) * 1.35;
  let h = Math.max(maxY - minY, 16) * 1.5;
  if (w / h > 2) h = w / 2; else w = h * 2;
  w = Math.min(w, 360);
  h = Math.min(h, 180);
  const x = Math.min(Math.max((minX + maxX) / 2 - w / 2, -180), 180 - w);
  const y = Math.min(Math.max((minY + maxY) / 2 - h / 2, -90), 90 - h);
  return { x, y, w, h };
}

function graticule(view, step) {
  const lines = [];
  for (let lon = -180; lon <= 180; lon += step) {
    if (lon >= view.x - step && lon <= view.x + view.w + step) lines.push(`M${lon} -90V90`);
  }
  for (let lat = -90; lat <= 90; lat += step) {
    if (-lat >= view.y - step && -lat <= view.y + view.h + step) lines.push(`M-180 ${-lat}H180`);
  }
  return s("path", { d: lines.join(""), class: "graticule" });
}

function curve(from, to, unit) {
  const [x1, y1] = from;
  const [x2, y2] = to;
  const mx = (x1 + x2) / 2;
  const my = (y1 + y2) / 2;
  const dx = x2 - x1;
  const dy = y2 - y1;
  const length = Math.hypot(dx, dy) || 1;
  // Bow the arc to the left of its direction, so A→B and B→A do not overlap.
  const bow = Math.max(length * 0.22, unit * 2);
  const cx = mx + (dy / length) * bow;
  const cy = my - (dx / length) * bow;
  // The count sits beyond the arc's apex, away from the PoPs' own labels.
  return { d: `M${x1} ${y1}Q${cx} ${cy} ${x2} ${y2}`, labelX: cx, labelY: cy };
}

/**
 * dataCenters: [{code, city, latitude, longitude}]
 * health: Map code -> {kind: ok|behind|down|unknown, text}
 * arcs: [{from, to, count}] (from === to: flows that left where they attached)
 */
export function drawMap({ dataCenters, health = new Map(), arcs = [], world = false, label = "Map of the PoPs" }) {
  const view = fit(dataCenters, world);
  const unit = view.w / 100;
  const where = new Map(dataCenters.map((dc) => [dc.code, [dc.longitude, -dc.latitude]]));
  const summary = dataCenters.map((dc) => `${dc.code} (${dc.city}): ${health.get(dc.code)?.text || "unknown"}`).join("; ");
  const arcText = arcs.map((arc) => `${arc.from} to ${arc.to}: ${arc.count} flows`).join("; ");
  const svg = s("svg", {
    viewBox: `${view.x} ${view.y} ${view.w} ${view.h}`, class: "map", role: "img",
    "aria-label": `${label}. ${summary}.${arcText ? ` Traffic: ${arcText}.` : ""}`,
    preserveAspectRatio: "xMidYMid meet",
  });
  svg.append(
    s("defs", {}, s("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerUnits: "userSpaceOnUse",
      markerWidth: String(unit * 1.6), markerHeight: String(unit * 1.6), orient: "auto",
    }, s("path", { d: "M0 0L10 5L0 10z", class: "arrowhead" }))),
    s("rect", { x: view.x, y: view.y, width: view.w, height: view.h, class: "sea" }),
    graticule(view, view.w > 150 ? 30 : 10),
    s("path", { d: LAND, class: "land" }),
  );
  const arcLayer = s("g", { class: "arcs" });
  const labels = s("g", { class: "arc-labels" });
  const widest = Math.max(1, ...arcs.map((arc) => arc.count));
  const away = (code, [x, y]) => {
    let nearest = null;
    let best = Infinity;
    for (const [other, [ox, oy]] of where) {
      const distance = Math.hypot(ox - x, oy - y);
      if (other !== code && distance < best) {
        best = distance;
        nearest = [ox, oy];
      }
    }
    if (!nearest || best === 0) return [Math.SQRT1_2, -Math.SQRT1_2];
    return [(x - nearest[0]) / best, (y - nearest[1]) / best];
  };
  for (const arc of arcs) {
    const from = where.get(arc.from);
    const to = where.get(arc.to);
    if (!from || !to) continue;
    const width = 1.5 + 3.5 * Math.log1p(arc.count) / Math.log1p(widest);
    let labelX;
    let labelY;
    if (arc.from === arc.to) {
      // A ring beside the PoP, on the side away from its nearest neighbour.
      const r = unit * 1.7;
      const [ax, ay] = away(arc.from, from);
      arcLayer.append(s("circle", { cx: from[0] + ax * r, cy: from[1] + ay * r, r, class: "arc arc-local", "stroke-width": width }));
      labelX = from[0] + ax * r * 2.8;
      labelY = from[1] + ay * r * 2.8;
    } else {
      const path = curve(from, to, unit);
      arcLayer.append(s("path", { d: path.d, class: "arc", "stroke-width": width, "marker-end": "url(#arrow)" }));
      labelX = path.labelX;
      labelY = path.labelY;
    }
    labels.append(s("text", { x: labelX, y: labelY, class: "arc-label", "font-size": unit * 2.2, "text-anchor": "middle", "dominant-baseline": "middle" }, String(arc.count)));
  }
  svg.append(arcLayer);
  const pops = s("g", { class: "pops" });
  for (const dc of dataCenters) {
    const [x, y] = where.get(dc.code);
    const state = health.get(dc.code);
    pops.append(s("g", { class: `pop pop-${state?.kind || "unknown"}`, "data-pop": dc.code },
      s("title", {}, `${dc.code} — ${dc.city}: ${state?.text || "unknown"}`),
      s("circle", { cx: x, cy: y, r: unit * 1.1 }),
      s("text", { x: x + unit * 1.6, y: y + unit * 2.4, "font-size": unit * 2.3 }, dc.code)));
  }
  svg.append(pops, labels);
  return svg;
}
