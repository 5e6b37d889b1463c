// Settings › Network: proxy_tcp, proxy_udp and fallback of one account, each with its
// consequence spelled out; after saving, the new configuration version and which PoPs
// have applied it (they confirm it to the control plane; /v1/ui/pops shows it).

import { api, enc, explain } from "../api.js";
import { busy, dedicatedBanner, heading, problemBox } from "../common.js";
import { clear, h, sleep } from "../dom.js";

const CONSEQUENCE = {
  tcp: {
    on: "TCP on: every proxied TCP flow — HTTP, HTTPS and any other port — leaves from your dedicated IPs, with no policy needed (R3).",
    off: "TCP off: TCP flows leave from the PoPs' shared addresses, and UDP is off with it (R3).",
  },
  udp: {
    on: "UDP on: HTTP/3 (QUIC) and other UDP flows leave from your dedicated IPs.",
    off: "UDP off: HTTP/3 (QUIC) and other UDP flows leave from the PoPs' shared addresses; browsers that fall back to HTTP/2 over TCP still use your dedicated IPs.",
    blocked: "UDP needs TCP: turn TCP on first (R3).",
  },
  fallback: {
    closed: "Closed: when no dedicated location is usable, flows that match no policy fail with a clear error — never silently from an address your allowlists do not know (R11).",
    shared: "Shared: when no dedicated location is usable, flows that match no policy leave from the connected PoP's shared address — they keep working, but allowlists will not admit them (R11).",
  },
};
const APPLY_TIMEOUT_MS = 60000;

export async function render(ctx) {
  const { main, signal, accountId } = ctx;
  const [account, dataCenters] = await Promise.all([
    api.get(`/v1/accounts/${enc(accountId)}`, { signal }), ctx.dataCenters()]);
  const network = account.network;

  const tcp = h("input", { type: "checkbox", id: "proxy-tcp", name: "proxy_tcp", "aria-describedby": "proxy-tcp-effect" });
  const udp = h("input", { type: "checkbox", id: "proxy-udp", name: "proxy_udp", "aria-describedby": "proxy-udp-effect" });
  const tcpEffect = h("p", { class: "effect", id: "proxy-tcp-effect" });
  const udpEffect = h("p", { class: "effect", id: "proxy-udp-effect" });
  tcp.checked = network.proxy_tcp;
  udp.checked = network.proxy_udp;
  const fallbackRadios = ["closed", "shared"].map((value) => {
    const input = h("input", { type: "radio", name: "fallback", value, id: `fallback-${value}`, "aria-describedby": `fallback-${value}-effect` });
    input.checked = network.fallback === value;
    return input;
  });
  const save = h("button", { type: "submit", class: "primary" }, "Save");
  const problem = problemBox();
  const saved = h("p", { class: "status", role: "status", id: "save-status" });
  const propagation = h("ul", { class: "propagation", id: "propagation", "aria-live": "polite" });

  function describe() {
    if (!tcp.checked) udp.checked = false;
    udp.disabled = !tcp.checked;
    tcpEffect.textContent = tcp.checked ? CONSEQUENCE.tcp.on : CONSEQUENCE.tcp.off;
    udpEffect.textContent = !tcp.checked ? CONSEQUENCE.udp.blocked : udp.checked ? CONSEQUENCE.udp.on : CONSEQUENCE.udp.off;
  }
  tcp.addEventListener("change", describe);
  udp.addEventListener("change", describe);
  describe();

  const form = h("form", { class: "card settings", "aria-labelledby": "network-title" },
    h("h2", { id: "network-title" }, "Proxy"),
    h("p", { class: "muted" }, "Which flows of ", h("strong", {}, account.name), " leave from its dedicated egress IPs."),
    h("div", { class: "toggle" }, tcp, h("label", { for: "proxy-tcp" }, "Proxy TCP"), tcpEffect),
    h("div", { class: "toggle" }, udp, h("label", { for: "proxy-udp" }, "Proxy UDP (HTTP/3)"), udpEffect),
    h("fieldset", {},
      h("legend", {}, "When no dedicated location is usable (fallback)"),
      ...fallbackRadios.map((radio) => h("div", { class: "toggle" }, radio,
        h("label", { for: radio.id }, radio.value === "closed" ? "Fail closed (default)" : "Use shared addresses"),
        h("p", { class: "effect", id: `${radio.id}-effect` }, CONSEQUENCE.fallback[radio.value])))),
    h("p", { class: "muted" }, "Never through dedicated IPs, whatever these say: DNS queries the gateway resolves, and flows to private routes (tunnel, WAN) (R4)."),
    h("div", { class: "actions" }, save),
    problem.element,
    saved);

  main.append(
    heading("Settings › Network", accountId),
    dedicatedBanner(account),
    form,
    h("section", { class: "card", "aria-labelledby": "prop-title" },
      h("h2", { id: "prop-title" }, "PoPs"),
      h("p", { class: "muted" }, "Every change is a new configuration version; each PoP applies it and confirms it to the control plane, within 2 seconds (R14)."),
      propagation));

  const names = new Map(dataCenters.map((dc) => [dc.code, dc.city]));
  let tracking = 0;

  function line(code, status, target, savedAt) {
    const city = names.get(code) ? ` (${names.get(code)})` : "";
    if (!status) return h("li", { "data-pop": code, "data-state": "unknown" }, h("strong", {}, code), `${city}: never connected — it applies the configuration when it first polls`);
    if (status.version >= target) {
      const when = savedAt && status.appliedAfter !== undefined ? ` (${status.appliedAfter.toFixed(1)} s after saving)` : "";
      if (!savedAt) return h("li", { "data-pop": code, "data-state": "current" }, h("strong", {}, code), `${city}: runs version ${status.version}, the newest`);
      return h("li", { "data-pop": code, "data-state": "applied" }, h("strong", {}, code), `${city}: applied version ${status.version}${when}`);
    }
    if (status.seconds_since_seen > 60) {
      return h("li", { "data-pop": code, "data-state": "silent" }, h("strong", {}, code),
        `${city}: not heard from for ${Math.round(status.seconds_since_seen)} s — runs version ${status.version} (its last good configuration) until it reconnects`);
    }
    return h("li", { "data-pop": code, "data-state": "waiting" }, h("strong", {}, code), `${city}: waiting — runs version ${status.version}`);
  }

  async function show(target, savedAt) {
    const status = await api.get("/v1/ui/pops", { signal });
    const byPop = new Map(status.pops.map((pop) => [pop.pop, pop]));
    const codes = [...new Set([...dataCenters.map((dc) => dc.code), ...byPop.keys()])];
    const goal = target ?? status.version;
    if (savedAt) {
      for (const [code, pop] of byPop) {
        if (pop.version >= goal && !applied.has(code)) applied.set(code, (performance.now() - savedAt) / 1000);
        if (applied.has(code)) pop.appliedAfter = applied.get(code);
      }
    }
    clear(propagation).append(...codes.map((code) => line(code, byPop.get(code), goal, savedAt)));
    return { status, done: codes.every((code) => (byPop.get(code)?.version ?? -1) >= goal) };
  }
  const applied = new Map();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.hide();
    saved.textContent = "";
    const fallback = fallbackRadios.find((radio) => radio.checked)?.value || "closed";
    const body = { proxy_tcp: tcp.checked, proxy_udp: tcp.checked && udp.checked, fallback };
    let result;
    try {
      result = await busy(save, () => api.patch(`/v1/accounts/${enc(accountId)}/settings/network`, body, { signal }));
    } catch (failure) {
      if (!signal.aborted) problem.show(failure);
      return;
    }
    ctx.invalidateAccount(accountId);
    const savedAt = performance.now();
    tracking += 1;
    const mine = tracking;
    try {
      const { status } = await show(undefined, null);
      const version = status.version;
      saved.textContent = `Saved: TCP ${result.proxy_tcp ? "on" : "off"}, UDP ${result.proxy_udp ? "on" : "off"}, fallback ${result.fallback}. New configuration version ${version}; waiting for the PoPs to apply it.`;
      saved.dataset.version = String(version);
      applied.clear();
      const deadline = savedAt + APPLY_TIMEOUT_MS;
      while (!signal.aborted && mine === tracking) {
        const { done } = await show(version, savedAt);
        if (done) {
          saved.textContent = `Saved as configuration version ${version}: applied by every PoP.`;
          ctx.announce(`Version ${version} applied by every PoP`);
          return;
        }
        if (performance.now() > deadline) {
          saved.textContent = `Saved as configuration version ${version}. Some PoPs have not confirmed it yet: they keep serving their last good configuration.`;
          return;
        }
        await sleep(250, signal);
      }
    } catch (failure) {
      if (!signal.aborted && mine === tracking) saved.textContent = `Saved, but the PoP status cannot be read: ${explain(failure)}`;
    }
  });

  try {
    await show(undefined, null);
  } catch (failure) {
    propagation.append(h("li", { class: "error" }, explain(failure)));
  }
  ctx.ready();
}
