// Overview: every PoP on the map with its health (did it confirm the newest snapshot
// version recently, from /v1/ui/pops), and the selected account's traffic as arcs from
// connected PoP to egress PoP with live flow counts (from the flow feed).

import { api, explain } from "../api.js";
import { heading, table, emptyRow } from "../common.js";
import { bytes, clear, h, sleep } from "../dom.js";
import { tail } from "../flows.js";
import { drawMap } from "../map.js";

const SILENT_AFTER_S = 60; // PoPs long-poll every <= 25 s: two missed polls and more
const WINDOW_MS = 5 * 60 * 1000;

export function healthOf(dc, statuses, newest) {
  const status = statuses.get(dc.code);
  if (!status) return { kind: "unknown", text: "never connected", detail: "has not polled the control plane" };
  const ago = `${Math.round(status.seconds_since_seen)} s ago`;
  if (status.seconds_since_seen > SILENT_AFTER_S) {
    return { kind: "down", text: "silent", detail: `last heard ${ago}; serves its last good configuration (version ${status.version})` };
  }
  if (!status.current) return { kind: "behind", text: "behind", detail: `runs version ${status.version}, newest is ${newest}` };
  return { kind: "ok", text: "healthy", detail: `runs the newest version, heard ${ago}` };
}

export async function render(ctx) {
  const { main, signal, accountId } = ctx;
  const subject = accountId || (ctx.session.scope === "deployment" ? null : ctx.session.account_id);
  const mapBox = h("div", { class: "map-box" });
  const worldButton = h("button", { type: "button", "aria-pressed": "false" }, "Whole world");
  const popRows = h("tbody");
  const versionLine = h("p", { class: "muted", role: "status" });
  const trafficRows = h("tbody");
  const trafficNote = h("p", { class: "muted" });
  const feedState = h("span", { class: "feed-state", role: "status" });
  main.append(
    heading("Overview"),
    h("div", { class: "overview" },
      h("section", { class: "card map-card", "aria-labelledby": "map-title" },
        h("div", { class: "card-head" }, h("h2", { id: "map-title" }, "PoPs and traffic"), worldButton),
        mapBox,
        h("p", { class: "legend muted" },
          h("span", { class: "dot dot-ok" }), " healthy ",
          h("span", { class: "dot dot-behind" }), " behind ",
          h("span", { class: "dot dot-down" }), " silent ",
          h("span", { class: "dot dot-unknown" }), " never connected · arcs: connected PoP → egress PoP, with flow counts")),
      h("div", { class: "side" },
        h("section", { class: "card", "aria-labelledby": "pops-title" },
          h("h2", { id: "pops-title" }, "PoPs"),
          versionLine,
          h("table", { class: "grid", id: "pops" },
            h("thead", {}, h("tr", {}, ["PoP", "City", "Health", "Version", "Backbone RTT"].map((t) => h("th", { scope: "col" }, t)))),
            popRows),
          h("p", { class: "muted" }, "Backbone RTT: the round-trip time each PoP has to its peers, as it last reported (a few seconds ago at most); peers it cannot reach are marked unreachable. ",
            "Health: whether the PoP confirmed the newest configuration version within the last minute.")),
        h("section", { class: "card", "aria-labelledby": "traffic-title" },
          h("h2", { id: "traffic-title" }, `Traffic — ${subject || "all accounts"}`),
          h("p", { class: "muted" }, "Flows of the last 5 minutes, live: ", feedState),
          h("table", { class: "grid", id: "traffic" },
            h("thead", {}, h("tr", {}, ["Connected → egress", "Flows", "Paths", "Bytes ↑", "Bytes ↓"].map((t) => h("th", { scope: "col" }, t)))),
            trafficRows),
          trafficNote))));

  let dataCenters = [];
  let health = new Map();
  let world = false;
  const recent = []; // {at, from, to, path, up, down}

  function arcs() {
    const cutoff = Date.now() - WINDOW_MS;
    while (recent.length && recent[0].at < cutoff) recent.shift();
    const pairs = new Map();
    for (const flow of recent) {
      const key = `${flow.from}>${flow.to}`;
      const pair = pairs.get(key) || { from: flow.from, to: flow.to, count: 0, up: 0, down: 0, paths: new Set() };
      pair.count += 1;
      pair.up += flow.up;
      pair.down += flow.down;
      if (flow.path) pair.paths.add(flow.path);
      pairs.set(key, pair);
    }
    return [...pairs.values()].sort((a, b) => b.count - a.count);
  }

  function drawAll() {
    const current = arcs();
    clear(mapBox).append(drawMap({ dataCenters, health, arcs: current, world, label: `Map of ${dataCenters.length} PoPs` }));
    clear(trafficRows).append(...(current.length ? current.map((pair) => h("tr", { "data-arc": `${pair.from}>${pair.to}` },
      h("th", { scope: "row" }, `${pair.from} → ${pair.to}`),
      h("td", { class: "num" }, String(pair.count)),
      h("td", {}, [...pair.paths].join(", ") || "–"),
      h("td", { class: "num" }, bytes(pair.up)),
      h("td", { class: "num" }, bytes(pair.down)))) : [emptyRow(5, `No flows${subject ? ` of ${subject}` : ""} in the last 5 minutes.`)]));
  }

  worldButton.addEventListener("click", () => {
    world = !world;
    worldButton.setAttribute("aria-pressed", String(world));
    drawAll();
  });

  function rttCell(code, pop, dcs) {
    const view = pop && pop.view;
    if (!view) return h("td", { class: "muted" }, "not reported");
    const peers = dcs.filter((dc) => dc.code !== code).map((dc) => {
      const ms = view.rtt_ms[dc.code];
      if (!view.up.includes(dc.code)) return `${dc.code} unreachable`;
      return ms === undefined ? `${dc.code} –` : `${dc.code} ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
    });
    return h("td", { class: "rtt", "data-rtt": code }, peers.length ? peers.join(" · ") : "no peers");
  }

  async function refreshHealth() {
    const [dcs, status] = await Promise.all([ctx.dataCenters(), api.get("/v1/ui/pops", { signal })]);
    dataCenters = dcs;
    const statuses = new Map(status.pops.map((pop) => [pop.pop, pop]));
    health = new Map(dcs.map((dc) => [dc.code, healthOf(dc, statuses, status.version)]));
    versionLine.textContent = `Newest configuration: version ${status.version}.`;
    clear(popRows).append(...dcs.map((dc) => {
      const state = health.get(dc.code);
      const pop = statuses.get(dc.code);
      return h("tr", { "data-pop": dc.code },
        h("th", { scope: "row" }, dc.code),
        h("td", {}, `${dc.city}, ${dc.country}`),
        h("td", {}, h("span", { class: `badge badge-${state.kind}`, title: state.detail }, state.text), h("span", { class: "visually-hidden" }, `: ${state.detail}`)),
        h("td", { class: "num" }, pop ? String(pop.version) : "–"),
        rttCell(dc.code, pop, dcs));
    }));
    drawAll();
  }

  let firstFlows;
  const flowsSeen = new Promise((resolve) => { firstFlows = resolve; });
  tail({
    filters: { account: subject || undefined },
    signal,
    backlog: 1000,
    onStatus(status) {
      feedState.textContent = status.state === "live" ? "receiving." : `feed unavailable (${explain(status.error)}); retrying.`;
    },
    onFlows(flows) {
      for (const flow of flows) {
        if (!flow.connected_pop || !flow.egress_pop) continue;
        const at = Date.parse(flow.time) || Date.now();
        recent.push({ at, from: flow.connected_pop, to: flow.egress_pop, path: flow.path, up: flow.bytes_up || 0, down: flow.bytes_down || 0 });
      }
      recent.sort((a, b) => a.at - b.at);
      if (recent.length > 20000) recent.splice(0, recent.length - 20000);
      if (dataCenters.length) drawAll();
      firstFlows();
    },
  });
  trafficNote.textContent = subject
    ? "Arcs go from where devices attached (connected PoP) to where the packets left (egress PoP); a ring is traffic that left where it attached."
    : "All accounts. Choose an account at the top to see its traffic alone.";

  await refreshHealth();
  await flowsSeen;
  ctx.ready();
  (async () => {
    while (!signal.aborted) {
      await sleep(5000, signal);
      if (signal.aborted) return;
      try {
        await refreshHealth();
      } catch (failure) {
        if (!signal.aborted) versionLine.textContent = `Cannot refresh the PoP status: ${explain(failure)}`;
      }
    }
  })();
}
