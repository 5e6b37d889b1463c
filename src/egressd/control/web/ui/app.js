// The dashboard shell: sign-in, the header (navigation, account picker, sign-out) and a
// router over URL fragments (#/egress?account=acme). Each page is a module whose
// `render(ctx)` draws into <main>; leaving the page aborts `ctx.signal`, which ends its
// long polls and timers. Every byte of data comes from the public REST API (/v1).

import { api, explain, forgetToken, storeToken, storedToken, whenUnauthorized } from "./api.js";
import { clear, h } from "./dom.js";

const PAGES = {
  overview: { path: "/overview", title: "Overview", module: "./pages/overview.js" },
  egress: { path: "/egress", title: "Egress IPs", module: "./pages/egress.js", account: true },
  network: { path: "/settings/network", title: "Settings › Network", module: "./pages/network.js", account: true },
  policies: { path: "/policies", title: "Policies", module: "./pages/policies.js", account: true },
  devices: { path: "/devices", title: "Devices", module: "./pages/devices.js", account: true },
  flows: { path: "/flows", title: "Flow log", module: "./pages/flowlog.js" },
};
const BY_PATH = Object.fromEntries(Object.entries(PAGES).map(([name, page]) => [page.path, name]));
const ACCOUNT_KEY = "egressd.account";
const SESSION_KEY = "egressd.session"; // who the token is: saves a round trip on reload

const main = document.getElementById("main");
const state = { session: null, controller: null, dataCenters: null, accountInfo: new Map(), routed: 0 };

function parseHash() {
  const raw = location.hash.slice(1) || PAGES.overview.path;
  const [path, query] = raw.split("?", 2);
  return { path, params: new URLSearchParams(query || "") };
}

/** "#/egress?account=acme" for a page name and query parameters. */
export function href(name, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  const text = query.toString();
  return `#${PAGES[name].path}${text ? `?${text}` : ""}`;
}

function announce(text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 30);
}

// Sign-in and sign-out
// ---------------------------------------------------------------------------------------

function rememberSession(session) {
  state.session = session;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
}

function cachedSession() {
  try {
    const session = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    return session && typeof session.scope === "string" ? session : null;
  } catch {
    return null;
  }
}

function signOut(message) {
  forgetToken();
  sessionStorage.removeItem(ACCOUNT_KEY);
  sessionStorage.removeItem(SESSION_KEY);
  state.session = null;
  state.dataCenters = null;
  state.accountInfo.clear();
  state.controller?.abort();
  showSignIn(message);
}

function showSignIn(message) {
  document.getElementById("top").hidden = true;
  document.title = "Sign in · egressd";
  const input = h("input", {
    id: "token", name: "token", type: "password", autocomplete: "off", spellcheck: "false",
    required: true, size: 48, "aria-describedby": "token-hint",
  });
  const error = h("p", { class: "error", role: "alert", id: "sign-in-error" }, message || "");
  const form = h("form", { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in to egressd"),
    h("div", { class: "field" },
      h("label", { for: "token" }, "API token"),
      input,
      h("span", { class: "hint", id: "token-hint" },
        "An admin (deployment) token or an account token. `egressd serve` writes one to ",
        h("code", {}, ".egressd/admin.token"), "; `egressd token create` makes account tokens. ",
        "It is kept in this tab only (sessionStorage) and sent as Authorization: Bearer.")),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    error.textContent = "";
    try {
      const session = await api.get("/v1/ui/session", { token });
      if (session.scope === "pop") {
        error.textContent = "This is a PoP token: it can read snapshots only. Sign in with an admin or account token.";
        return;
      }
      storeToken(token);
      rememberSession(session);
      showChrome();
      route();
    } catch (failure) {
      error.textContent = failure.status === 401 ? `The control plane refused this token: ${failure.detail}` : explain(failure);
      input.focus();
    }
  });
  clear(main).append(form);
  main.dataset.ready = "sign-in";
  input.focus();
}

// Header: who, account picker
// ---------------------------------------------------------------------------------------

function showChrome() {
  const session = state.session;
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = session.scope === "deployment"
    ? `${session.name} (admin)` : `${session.name} (account ${session.account_id})`;
  const input = document.getElementById("account-input");
  const button = document.querySelector("#account-form button");
  if (session.scope === "account") {
    input.value = session.account_id;
    input.readOnly = true;
    button.hidden = true;
  } else {
    input.readOnly = false;
    button.hidden = false;
  }
}

let suggestTimer = 0;
async function suggest(text) {
  if (!state.session || state.session.scope !== "deployment") return;
  try {
    const index = await api.get("/v1/ui/accounts", { query: { q: text, limit: 20 } });
    const list = document.getElementById("account-options");
    list.replaceChildren(...index.accounts.map((account) =>
      h("option", { value: account.id }, `${account.name} · ${account.plan}`)));
  } catch {
    // suggestions are a convenience; the page itself reports errors
  }
}

function chooseAccount(id) {
  const { path, params } = parseHash();
  if (id) params.set("account", id); else params.delete("account");
  const text = params.toString();
  location.hash = `${BY_PATH[path] ? path : PAGES.overview.path}${text ? `?${text}` : ""}`;
}

function wireHeader() {
  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  const input = document.getElementById("account-input");
  input.addEventListener("input", () => {
    clearTimeout(suggestTimer);
    suggestTimer = setTimeout(() => suggest(input.value.trim()), 150);
  });
  input.addEventListener("focus", () => suggest(input.value.trim()), { once: true });
  document.getElementById("account-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.session?.scope === "deployment") chooseAccount(input.value.trim());
  });
  input.addEventListener("change", () => {
    // Picking a suggestion from the list opens it at once.
    const picked = [...document.getElementById("account-options").options].some((o) => o.value === input.value.trim());
    if (picked) chooseAccount(input.value.trim());
  });
}

async function accountSummary(id) {
  const summary = document.getElementById("account-summary");
  if (!id) {
    summary.textContent = "";
    return;
  }
  try {
    if (!state.accountInfo.has(id)) state.accountInfo.set(id, await api.get(`/v1/accounts/${encodeURIComponent(id)}`));
    const account = state.accountInfo.get(id);
    summary.textContent = `${account.name} · ${account.plan}`;
  } catch (failure) {
    summary.textContent = failure.status === 404 ? "no such account" : "";
  }
}

// Router
// ---------------------------------------------------------------------------------------

function dataCenters() {
  if (!state.dataCenters) {
    state.dataCenters = api.get("/v1/data-centers").catch((failure) => {
      state.dataCenters = null;
      throw failure;
    });
  }
  return state.dataCenters;
}

function currentAccount(params) {
  const session = state.session;
  if (session.scope === "account") return session.account_id;
  const id = params.get("account");
  if (id !== null) {
    if (id) sessionStorage.setItem(ACCOUNT_KEY, id); else sessionStorage.removeItem(ACCOUNT_KEY);
    return id || null;
  }
  return sessionStorage.getItem(ACCOUNT_KEY);
}

async function chooser(ctx, page) {
  const list = h("ul", { class: "plain" });
  clear(main).append(
    h("h1", { tabindex: "-1" }, page.title),
    h("p", {}, "Choose an account with the picker at the top (id or name), or one of these:"),
    list);
  try {
    const index = await api.get("/v1/ui/accounts", { query: { limit: 20 }, signal: ctx.signal });
    list.append(...index.accounts.map((account) => h("li", {},
      h("a", { href: href(ctx.page, { account: account.id }) }, account.id), ` — ${account.name} (${account.plan})`)));
    if (index.total > index.accounts.length) list.append(h("li", { class: "muted" }, `… ${index.total - index.accounts.length} more: search above`));
  } catch (failure) {
    list.append(h("li", { class: "error" }, explain(failure)));
  }
  ctx.ready();
}

async function route() {
  if (!state.session) return;
  const { path, params } = parseHash();
  const name = BY_PATH[path];
  state.controller?.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.routed += 1;
  main.dataset.ready = "";
  for (const link of document.querySelectorAll("nav a[data-route]")) {
    if (link.dataset.route === name) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  const accountId = currentAccount(params);
  const input = document.getElementById("account-input");
  if (document.activeElement !== input) input.value = accountId || "";
  accountSummary(accountId);
  for (const link of document.querySelectorAll("nav a[data-route]")) {
    link.href = href(link.dataset.route, { account: state.session.scope === "deployment" ? accountId : null });
  }
  if (!name) {
    clear(main).append(h("h1", { tabindex: "-1" }, "Not found"),
      h("p", {}, "No such page. ", h("a", { href: href("overview") }, "Go to the overview.")));
    return;
  }
  const page = PAGES[name];
  document.title = `${page.title}${accountId && page.account ? ` · ${accountId}` : ""} · egressd`;
  const ctx = {
    page: name, main, signal: controller.signal, session: state.session, accountId, params,
    dataCenters, href, announce,
    invalidateAccount: (id) => state.accountInfo.delete(id),
    ready() {
      if (controller.signal.aborted) return;
      main.dataset.ready = name;
      performance.mark(`egressd:ready:${name}`);
    },
  };
  const focusHeading = state.routed > 1;
  performance.mark(`egressd:route:${name}`);
  try {
    if (page.account && !accountId) {
      await chooser(ctx, page);
    } else {
      const module = await import(page.module);
      if (controller.signal.aborted) return;
      performance.mark(`egressd:module:${name}`);
      clear(main);
      await module.render(ctx);
    }
  } catch (failure) {
    if (controller.signal.aborted) return;
    clear(main).append(h("h1", { tabindex: "-1" }, page.title), h("p", { class: "error", role: "alert" }, explain(failure)));
    ctx.ready();
  }
  if (focusHeading && !controller.signal.aborted) main.querySelector("h1")?.focus({ preventScroll: true });
}

async function boot() {
  whenUnauthorized((failure) => signOut(`The control plane refused the token: ${failure.detail}`));
  wireHeader();
  window.addEventListener("hashchange", route);
  if (!storedToken()) {
    showSignIn();
    return;
  }
  const cached = cachedSession();
  if (cached) {
    // Draw at once with what the token was; check it meanwhile (a refused token signs out).
    state.session = cached;
    showChrome();
    const checked = api.get("/v1/ui/session").catch((failure) => {
      if (failure.status !== 401) console.warn("egressd: cannot check the session:", explain(failure));
      return null;
    });
    await route();
    const session = await checked;
    if (session && (session.scope !== cached.scope || session.account_id !== cached.account_id || session.name !== cached.name)) {
      rememberSession(session);
      showChrome();
      await route();
    }
    return;
  }
  try {
    rememberSession(await api.get("/v1/ui/session"));
  } catch (failure) {
    if (failure.status !== 401) showSignIn(explain(failure));
    return;
  }
  showChrome();
  await route();
}

boot();
