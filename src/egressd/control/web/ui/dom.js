// Small DOM helpers. Text always goes in as text nodes (never innerHTML), so names and
// addresses that come from the API cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "class") {
      el.setAttribute("class", value);
    } else if (key === "value" && "value" in el && !(el instanceof SVGElement)) {
      el.value = value;
      el.setAttribute("value", value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** h("button", {type: "button", onclick}, "Save") */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

let uid = 0;
export function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** A labelled form control: returns [wrapper, control]. */
export function field(label, control, hint) {
  if (!control.id) control.id = nextId("f");
  const parts = [h("label", { for: control.id }, label), control];
  if (hint) {
    const hintEl = h("span", { class: "hint", id: `${control.id}-hint` }, hint);
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return [h("div", { class: "field" }, parts), control];
}

export function badge(text, kind) {
  return h("span", { class: `badge badge-${kind}` }, text);
}

export function time(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return h("time", { datetime: iso, title: iso }, date.toISOString().replace("T", " ").slice(0, 19) + " UTC");
}

export function bytes(count) {
  if (count === null || count === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

/** Splits "a, b c" into ["a", "b", "c"]. */
export function words(text) {
  return text.split(/[\s,]+/).map((w) => w.trim()).filter(Boolean);
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
