// Flow log: a live tail of the flows the PoPs push (GET /v1/flows long poll), newest
// first, with filters by account, PoP, rule and outcome. Account tokens see their own
// account's flows only (the API enforces it).

import { explain } from "../api.js";
import { heading } from "../common.js";
import { bytes, clear, h } from "../dom.js";
import { OUTCOMES, tail } from "../flows.js";

const MAX_ROWS = 500;

function clock(iso) {
  if (!iso) return "–";
  const text = new Date(iso).toISOString();
  return h("time", { datetime: iso, title: iso }, text.slice(11, 23));
}

function destination(flow) {
  const host = flow.hostname || flow.destination || "?";
  const port = flow.port ? `:${flow.port}` : "";
  const literal = flow.hostname && flow.destination && flow.hostname !== flow.destination ? ` (${flow.destination})` : "";
  return `${host}${port}${literal}`;
}

function outcomeBadge(outcome) {
  const kind = outcome === "ok" ? "ok" : outcome === "refused" || outcome === "auth-failed" ? "down" : "warn";
  return h("span", { class: `badge badge-${kind}` }, outcome || "?");
}

export async function render(ctx) {
  const { main, signal, session } = ctx;
  const admin = session.scope === "deployment";
  const dataCenters = await ctx.dataCenters();
  const account = h("input", {
    id: "filter-account", type: "search", list: "account-options", size: 14, spellcheck: "false",
    value: admin ? (ctx.params.get("account") ?? ctx.accountId ?? "") : session.account_id, readonly: !admin,
  });
  const pop = h("select", { id: "filter-pop" }, h("option", { value: "" }, "any"),
    dataCenters.map((dc) => h("option", { value: dc.code }, `${dc.code} — ${dc.city}`)));
  const rule = h("input", { id: "filter-rule", type: "search", size: 12, spellcheck: "false", placeholder: "R7, policy:bank" });
  const outcome = h("select", { id: "filter-outcome" }, h("option", { value: "" }, "any"), OUTCOMES.map((value) => h("option", { value }, value)));
  pop.value = ctx.params.get("pop") || "";
  rule.value = ctx.params.get("rule") || "";
  outcome.value = ctx.params.get("outcome") || "";
  const pause = h("button", { type: "button", "aria-pressed": "false", id: "flows-pause" }, "Pause");
  const clearButton = h("button", { type: "button" }, "Clear");
  const feedStatus = h("p", { class: "status", role: "status", id: "flows-status" }, "Connecting…");
  const rows = h("tbody");
  const emptyRow = h("tr", { class: "empty-row" }, h("td", { colspan: 12, class: "empty" }, "No flows yet: they appear here as the PoPs report them."));
  rows.append(emptyRow);

  const filters = h("form", { class: "card filters", id: "flow-filters", role: "search", "aria-label": "Flow filters" },
    h("div", { class: "field" }, h("label", { for: "filter-account" }, "Account"), account),
    h("div", { class: "field" }, h("label", { for: "filter-pop" }, "Connected PoP"), pop),
    h("div", { class: "field" }, h("label", { for: "filter-rule" }, "Rule"), rule),
    h("div", { class: "field" }, h("label", { for: "filter-outcome" }, "Outcome"), outcome),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Apply"), pause, clearButton));

  main.append(
    heading("Flow log"),
    filters,
    feedStatus,
    h("div", { class: "table-scroll" },
      h("table", { class: "grid flows", id: "flows" },
        h("caption", { class: "visually-hidden" }, "Flows, newest first"),
        h("thead", {}, h("tr", {}, ["Time (UTC)", "Account", "User / device", "Proto", "Destination", "Connected → egress", "Source", "Rule", "Path", "Outcome", "↑ / ↓", "ms"]
          .map((label) => h("th", { scope: "col" }, label)))),
        rows)));

  let paused = false;
  let held = [];
  let feed = null;
  let readyOnce = false;

  function row(flow) {
    return h("tr", { "data-flow": flow.flow_id || "", "data-outcome": flow.outcome || "" },
      h("td", { class: "mono" }, clock(flow.time)),
      h("td", {}, flow.account || "–"),
      h("td", {}, [flow.user, flow.device].filter(Boolean).join(" / ") || "–"),
      h("td", {}, flow.protocol || "–"),
      h("td", { class: "mono" }, destination(flow)),
      h("td", {}, `${flow.connected_pop || "?"} → ${flow.egress_pop || "–"}`),
      h("td", { class: "mono" }, flow.source || "–"),
      h("td", { class: "mono" }, flow.rule || "–"),
      h("td", {}, flow.path || "–"),
      h("td", {}, outcomeBadge(flow.outcome), flow.error ? h("span", { class: "flow-error", title: flow.error }, flow.error) : null),
      h("td", { class: "num" }, `${bytes(flow.bytes_up)} / ${bytes(flow.bytes_down)}`),
      h("td", { class: "num" }, flow.duration_ms !== undefined && flow.duration_ms !== null ? String(Math.round(flow.duration_ms)) : "–"));
  }

  function show(flows) {
    if (!flows.length) return;
    emptyRow.remove();
    const fragment = document.createDocumentFragment();
    for (const flow of flows.slice().reverse()) fragment.append(row(flow));
    rows.prepend(fragment);
    while (rows.rows.length > MAX_ROWS) rows.lastElementChild.remove();
  }

  function start() {
    feed?.abort();
    feed = new AbortController();
    const stop = () => feed.abort();
    signal.addEventListener("abort", stop, { once: true });
    const current = feed;
    const wanted = { account: account.value.trim() || undefined, pop: pop.value || undefined, rule: rule.value.trim() || undefined, outcome: outcome.value || undefined };
    tail({
      filters: wanted,
      signal: current.signal,
      onStatus(state) {
        if (current.signal.aborted) return;
        feedStatus.textContent = state.state === "live"
          ? (paused ? `Paused: ${held.length} new flow${held.length === 1 ? "" : "s"} held.` : "Live: new flows appear at the top.")
          : `Flow feed unavailable: ${explain(state.error)}. Retrying in ${Math.round(state.retryMs / 1000)} s.`;
      },
      onFlows(flows) {
        if (current.signal.aborted) return;
        if (paused) {
          held.push(...flows);
          feedStatus.textContent = `Paused: ${held.length} new flow${held.length === 1 ? "" : "s"} held.`;
        } else {
          show(flows);
        }
        if (!readyOnce) {
          readyOnce = true;
          ctx.ready();
        }
      },
    });
  }

  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    clear(rows).append(emptyRow);
    held = [];
    start();
  });
  for (const control of [pop, outcome]) control.addEventListener("change", () => filters.requestSubmit());
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      show(held);
      held = [];
      feedStatus.textContent = "Live: new flows appear at the top.";
    } else {
      feedStatus.textContent = "Paused: new flows are held until you resume.";
    }
  });
  clearButton.addEventListener("click", () => {
    clear(rows).append(emptyRow);
  });
  start();
}
