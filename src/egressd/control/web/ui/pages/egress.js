// Egress IPs: the account's dedicated locations grouped by city, with their state
// (active, pending allowlist confirmation, quarantined after release), the account's R2
// status, and assign / confirm / release through the API — its refusals are shown with
// their detail and rule. IPv6 prefixes and the geofeed link.

import { api, enc, explain } from "../api.js";
import { busy, confirmAction, dedicatedBanner, emptyRow, heading, problemBox, table } from "../common.js";
import { clear, h, time } from "../dom.js";

export async function render(ctx) {
  const { main, signal, accountId, session } = ctx;
  const admin = session.scope === "deployment";
  const banner = h("div");
  const groups = h("div", { class: "city-groups", id: "locations" });
  const ipv6 = h("div", { id: "ipv6" });
  const problem = problemBox(); // the assign form's
  const rowProblem = problemBox(); // confirm and release
  const done = h("p", { class: "status", role: "status", id: "egress-status", tabindex: "-1" });
  const form = h("form", { class: "card", id: "assign", "aria-labelledby": "assign-title" });

  main.append(
    heading("Egress IPs", accountId),
    banner,
    done,
    rowProblem.element,
    h("p", { class: "muted" },
      "Dedicated egress becomes active once the account holds active locations in two different cities (R2). ",
      "A newly assigned address stays pending until you confirm that the allowlists that must admit it are updated. ",
      "A released address is quarantined before anyone else can be given it. Geolocation of every address: ",
      h("a", { href: "/geofeed.csv" }, "geofeed.csv (RFC 8805)"), "."),
    groups,
    h("section", { class: "card", "aria-labelledby": "ipv6-title" },
      h("h2", { id: "ipv6-title" }, "IPv6 prefixes"),
      h("p", { class: "muted" }, "Every PoP carries every location's IPv6 range: IPv6 flows leave from the connected PoP, from an address in the range that the geofeed places in the location's city (R9)."),
      ipv6),
    form);

  let dataCenters = [];

  async function load() {
    const [account, locations, quarantined, dcs] = await Promise.all([
      api.get(`/v1/accounts/${enc(accountId)}`, { signal }),
      api.get(`/v1/accounts/${enc(accountId)}/locations`, { signal }),
      api.get(`/v1/ui/accounts/${enc(accountId)}/quarantine`, { signal }),
      ctx.dataCenters(),
    ]);
    dataCenters = dcs;
    clear(banner).append(dedicatedBanner(account));
    drawLocations(locations, quarantined);
    return account;
  }

  function drawLocations(locations, quarantined) {
    const cities = new Map();
    const cityOf = new Map(dataCenters.map((dc) => [dc.code, dc.city]));
    const add = (city, row) => {
      if (!cities.has(city)) cities.set(city, []);
      cities.get(city).push(row);
    };
    for (const location of locations) add(location.city, { kind: "location", location });
    for (const entry of quarantined) add(entry.city || cityOf.get(entry.data_center) || "?", { kind: "quarantine", entry });
    clear(groups);
    if (cities.size === 0) {
      groups.append(h("section", { class: "card" }, h("h2", {}, "Locations"), h("p", { class: "empty" }, "No dedicated locations. Assign addresses below: at least two cities.")));
    }
    for (const city of [...cities.keys()].sort()) {
      const rows = cities.get(city).map((row) => (row.kind === "location" ? locationRow(row.location) : quarantineRow(row.entry)));
      groups.append(h("section", { class: "card", "aria-label": city, "data-city": city },
        table(`${city}`, ["Location", "PoP", "IPv4", "IPv6 prefix", "State", "Since", "Actions"], rows)));
    }
    const ranges = locations.filter((location) => location.ipv6);
    clear(ipv6).append(table(null, ["Prefix", "Location", "City", "State"], ranges.length
      ? ranges.map((location) => h("tr", {},
        h("td", { class: "addr" }, location.ipv6), h("td", {}, location.id), h("td", {}, location.city),
        h("td", {}, stateBadge(location.state))))
      : [emptyRow(4, "No IPv6 prefixes: IPv6 flows leave from the PoPs' shared prefixes.")]));
  }

  function stateBadge(state) {
    const text = { active: "active", pending: "pending confirmation", quarantined: "quarantined" }[state] || state;
    const kind = { active: "ok", pending: "warn", quarantined: "down" }[state] || "info";
    return h("span", { class: `badge badge-${kind}`, "data-state": state }, text);
  }

  function locationRow(location) {
    const actions = [];
    if (location.state === "pending") {
      const confirmButton = h("button", { type: "button", "aria-label": `Confirm allowlists updated for ${location.id}` }, "Confirm allowlists updated");
      confirmButton.addEventListener("click", () => act(confirmButton, async () => {
        await api.post(`/v1/accounts/${enc(accountId)}/locations/${enc(location.id)}/confirm`, undefined, { signal });
        return `Location ${location.id} (${location.ipv4}) confirmed: in use from the next configuration version.`;
      }));
      actions.push(confirmButton);
    }
    const release = h("button", { type: "button", class: "danger", "aria-label": `Release ${location.id}` }, "Release");
    release.addEventListener("click", async () => {
      const addresses = [location.ipv4, location.ipv6].filter(Boolean).join(" and ");
      const ok = await confirmAction({
        title: `Release location ${location.id}?`,
        body: [`${addresses} go into quarantine: nobody else can be given them during the deployment's cool-down (R2), so stale allowlists admit no stranger.`,
          "If this leaves active locations in fewer than two cities, dedicated egress stops and flows leave from shared addresses."],
        confirm: "Release",
      });
      if (!ok) {
        release.focus();
        return;
      }
      await act(release, async () => {
        await api.del(`/v1/accounts/${enc(accountId)}/locations/${enc(location.id)}`, { signal });
        return `Location ${location.id} released: ${addresses} quarantined.`;
      });
    });
    actions.push(release);
    return h("tr", { "data-location": location.id },
      h("th", { scope: "row" }, location.id),
      h("td", {}, location.pop),
      h("td", { class: "addr" }, location.ipv4),
      h("td", { class: "addr" }, location.ipv6 || "–"),
      h("td", {}, stateBadge(location.state)),
      h("td", {}, time(location.assigned_at)),
      h("td", { class: "row-actions" }, actions));
  }

  function quarantineRow(entry) {
    return h("tr", { "data-quarantined": entry.address },
      h("th", { scope: "row" }, h("span", { class: "muted" }, "released")),
      h("td", {}, entry.data_center),
      h("td", { class: "addr" }, entry.family === 4 ? entry.address : "–"),
      h("td", { class: "addr" }, entry.family === 6 ? entry.address : "–"),
      h("td", {}, stateBadge("quarantined")),
      h("td", {}, h("span", {}, "until "), time(entry.until)),
      h("td", { class: "muted" }, "cannot be reassigned before then"));
  }

  async function act(button, work, box = rowProblem) {
    problem.hide();
    rowProblem.hide();
    done.textContent = "";
    try {
      const message = await busy(button, work);
      ctx.invalidateAccount(accountId);
      const account = await load();
      done.textContent = `${message} Dedicated egress: ${account.dedicated.status === "needs-second-city" ? "needs a second city" : account.dedicated.status} — ${account.dedicated.detail}.`;
      done.focus();
    } catch (failure) {
      if (signal.aborted) return;
      box.show(failure);
    }
  }

  // Assign
  // -------------------------------------------------------------------------------------

  function buildForm() {
    const idInput = h("input", { id: "assign-id", name: "id", placeholder: "the PoP's code", pattern: "[a-z0-9][a-z0-9_-]{0,62}", size: 14 });
    const confirmed = h("input", { type: "checkbox", id: "assign-confirmed", name: "confirmed" });
    const submit = h("button", { type: "submit", class: "primary" }, "Assign");
    let ipv4;
    let ipv6;
    const addressFields = h("div", { class: "row" });
    if (admin) {
      const pop = h("select", { id: "assign-pop", name: "pop", required: true },
        h("option", { value: "" }, "— choose a PoP —"),
        dataCenters.map((dc) => h("option", { value: dc.code }, `${dc.code} — ${dc.city}`)));
      ipv4 = h("select", { id: "assign-ipv4", name: "ipv4", required: true, disabled: true }, h("option", { value: "" }, "— choose a PoP first —"));
      ipv6 = h("select", { id: "assign-ipv6", name: "ipv6", disabled: true }, h("option", { value: "" }, "none"));
      const inventory = h("span", { class: "hint", id: "assign-inventory", role: "status" });
      pop.addEventListener("change", async () => {
        ipv4.disabled = true;
        ipv6.disabled = true;
        clear(ipv4).append(h("option", { value: "" }, "loading…"));
        clear(ipv6).append(h("option", { value: "" }, "none"));
        inventory.textContent = "";
        if (!pop.value) return;
        try {
          const free = await api.get("/v1/addresses", { query: { free: true, kind: "dedicated", data_center: pop.value, limit: 500 }, signal });
          const v4 = free.filter((address) => address.family === 4);
          const v6 = free.filter((address) => address.family === 6);
          clear(ipv4).append(h("option", { value: "" }, v4.length ? "— choose an address —" : "no free address here"),
            ...v4.map((address) => h("option", { value: address.address }, address.address)));
          ipv6.append(...v6.map((address) => h("option", { value: address.address }, address.address)));
          ipv4.disabled = v4.length === 0;
          ipv6.disabled = v6.length === 0;
          inventory.textContent = `${v4.length} free IPv4 address${v4.length === 1 ? "" : "es"} and ${v6.length} IPv6 prefix${v6.length === 1 ? "" : "es"} at ${pop.value} in the inventory${v4.length === 500 ? " (first 500)" : ""}.`;
        } catch (failure) {
          clear(ipv4).append(h("option", { value: "" }, "cannot list the inventory"));
          inventory.textContent = explain(failure);
        }
      });
      addressFields.append(
        h("div", { class: "field" }, h("label", { for: "assign-pop" }, "PoP"), pop),
        h("div", { class: "field" }, h("label", { for: "assign-ipv4" }, "IPv4 address"), ipv4),
        h("div", { class: "field" }, h("label", { for: "assign-ipv6" }, "IPv6 prefix (optional)"), ipv6),
        inventory);
    } else {
      ipv4 = h("input", { id: "assign-ipv4", name: "ipv4", required: true, placeholder: "203.0.113.20", size: 16, spellcheck: "false" });
      ipv6 = h("input", { id: "assign-ipv6", name: "ipv6", placeholder: "2001:db8:120::/48", size: 22, spellcheck: "false" });
      addressFields.append(
        h("div", { class: "field" }, h("label", { for: "assign-ipv4" }, "IPv4 address"), ipv4,
          h("span", { class: "hint" }, "A dedicated address of the inventory, given to you by the operator.")),
        h("div", { class: "field" }, h("label", { for: "assign-ipv6" }, "IPv6 prefix (optional)"), ipv6,
          h("span", { class: "hint" }, "At the same PoP as the IPv4 address.")));
    }
    clear(form).append(
      h("h2", { id: "assign-title" }, "Assign a dedicated location"),
      addressFields,
      h("div", { class: "row" },
        h("div", { class: "field" }, h("label", { for: "assign-id" }, "Location id (optional)"), idInput),
        h("div", { class: "toggle" }, confirmed,
          h("label", { for: "assign-confirmed" }, "Allowlists are already updated (or need none): use it at once"))),
      h("div", { class: "actions" }, submit),
      problem.element);
    form.onsubmit = async (event) => {
      event.preventDefault();
      const body = { ipv4: ipv4.value.trim(), confirmed: confirmed.checked };
      if (ipv6.value.trim()) body.ipv6 = ipv6.value.trim();
      if (idInput.value.trim()) body.id = idInput.value.trim();
      await act(submit, async () => {
        const location = await api.post(`/v1/accounts/${enc(accountId)}/locations`, body, { signal });
        if (admin) document.getElementById("assign-pop").dispatchEvent(new Event("change"));
        idInput.value = "";
        confirmed.checked = false;
        return `Assigned ${location.ipv4}${location.ipv6 ? ` and ${location.ipv6}` : ""} as location ${location.id} (${location.city}): ${location.state === "pending" ? "pending — update the allowlists, then confirm." : "active."}`;
      }, problem);
    };
  }

  await load();
  buildForm();
  ctx.ready();
}
