// Policies: the account's ordered egress policies (first match wins, R6). Reordered with
// buttons (PUT /policies/order with the whole new order), added and deleted.

import { api, enc } from "../api.js";
import { busy, confirmAction, emptyRow, heading, problemBox } from "../common.js";
import { clear, h, words } from "../dom.js";

function matchText(policy) {
  const parts = [];
  const add = (label, values) => {
    if (values && values.length) parts.push(`${label}=${values.join(",")}`);
  };
  add("users", policy.users);
  add("groups", policy.groups);
  add("devices", policy.devices);
  add("dest", policy.destinations);
  add("ports", policy.ports);
  add("proto", policy.protocols);
  add("pops", policy.connected_pops);
  return parts.length ? parts.join(" ") : "any flow";
}

function egressText(policy) {
  if (policy.action === "shared") return "shared address of the connected PoP";
  const ipv6 = policy.ipv6 || policy.primary;
  return `dedicated ${policy.primary}, else ${policy.secondary}; IPv6 ${ipv6}`;
}

export async function render(ctx) {
  const { main, signal, accountId } = ctx;
  const path = `/v1/accounts/${enc(accountId)}`;
  const [initial, locations, groups, dataCenters] = await Promise.all([
    api.get(`${path}/policies`, { signal }),
    api.get(`${path}/locations`, { signal }),
    api.get(`${path}/groups`, { signal }),
    ctx.dataCenters(),
  ]);
  let policies = initial;
  const rows = h("tbody");
  const listProblem = problemBox();
  const status = h("p", { class: "status", role: "status", id: "policies-status" });

  main.append(
    heading("Policies", accountId),
    h("p", { class: "muted" }, "Evaluated top to bottom: the first policy that matches a flow chooses its egress. Policies never allow or block (R6). ",
      "A flow that matches none uses the most performant healthy dedicated location for its connected PoP (when dedicated egress is active), else the shared address."),
    status,
    listProblem.element,
    h("section", { class: "card", "aria-labelledby": "order-title" },
      h("h2", { id: "order-title" }, "Order"),
      h("table", { class: "grid", id: "policies" },
        h("thead", {}, h("tr", {}, ["#", "Policy", "Match", "Egress", "Actions"].map((label) => h("th", { scope: "col" }, label)))),
        rows)));

  function draw(focus) {
    clear(rows);
    if (!policies.length) rows.append(emptyRow(5, "No policies: every flow takes the default egress."));
    policies.forEach((policy, index) => {
      const up = h("button", { type: "button", "aria-label": `Move ${policy.id} up`, disabled: index === 0, "data-move": "up" }, "↑ Up");
      const down = h("button", { type: "button", "aria-label": `Move ${policy.id} down`, disabled: index === policies.length - 1, "data-move": "down" }, "↓ Down");
      const remove = h("button", { type: "button", class: "danger", "aria-label": `Delete ${policy.id}` }, "Delete");
      up.addEventListener("click", () => move(policy.id, -1));
      down.addEventListener("click", () => move(policy.id, +1));
      remove.addEventListener("click", () => removePolicy(policy, remove));
      rows.append(h("tr", { "data-policy": policy.id },
        h("td", { class: "num" }, String(index)),
        h("th", { scope: "row" }, h("span", { class: "mono" }, policy.id), policy.name ? h("span", { class: "muted" }, ` ${policy.name}`) : null),
        h("td", { class: "mono" }, matchText(policy)),
        h("td", {}, egressText(policy)),
        h("td", { class: "row-actions" }, up, down, remove)));
    });
    if (focus) {
      const row = rows.querySelector(`tr[data-policy="${CSS.escape(focus.id)}"]`);
      const button = row?.querySelector(`button[data-move="${focus.direction}"]:not([disabled])`) || row?.querySelector("button[data-move]:not([disabled])");
      button?.focus();
    }
  }

  async function move(id, step) {
    const index = policies.findIndex((policy) => policy.id === id);
    const target = index + step;
    if (index < 0 || target < 0 || target >= policies.length) return;
    const ids = policies.map((policy) => policy.id);
    [ids[index], ids[target]] = [ids[target], ids[index]];
    listProblem.hide();
    try {
      policies = await api.put(`${path}/policies/order`, { ids }, { signal });
      draw({ id, direction: step < 0 ? "up" : "down" });
      status.textContent = `${id} moved to position ${target} of ${policies.length - 1}.`;
    } catch (failure) {
      if (!signal.aborted) listProblem.show(failure);
    }
  }

  async function removePolicy(policy, button) {
    const ok = await confirmAction({ title: `Delete policy ${policy.id}?`, body: `Flows it matched fall through to the next policy (${matchText(policy)}).`, confirm: "Delete" });
    if (!ok) {
      button.focus();
      return;
    }
    listProblem.hide();
    try {
      await busy(button, () => api.del(`${path}/policies/${enc(policy.id)}`, { signal }));
      policies = await api.get(`${path}/policies`, { signal });
      draw();
      status.textContent = `Policy ${policy.id} deleted.`;
      main.querySelector("h1").focus();
    } catch (failure) {
      if (!signal.aborted) listProblem.show(failure);
    }
  }

  // Add
  // -------------------------------------------------------------------------------------

  const formProblem = problemBox();
  const idInput = h("input", { id: "policy-id", required: true, pattern: "[a-z0-9][a-z0-9_-]{0,62}", size: 16, spellcheck: "false" });
  const nameInput = h("input", { id: "policy-name", size: 28 });
  const destinations = h("input", { id: "policy-destinations", size: 34, spellcheck: "false", placeholder: "*.bank.example 198.51.100.0/24" });
  const ports = h("input", { id: "policy-ports", size: 14, placeholder: "443 8000-8099" });
  const usersInput = h("input", { id: "policy-users", size: 20, spellcheck: "false" });
  const groupsInput = h("input", { id: "policy-groups", size: 20, spellcheck: "false" });
  const protocolBoxes = ["tcp", "udp"].map((proto) => h("input", { type: "checkbox", id: `policy-proto-${proto}`, value: proto }));
  const popBoxes = dataCenters.map((dc) => h("input", { type: "checkbox", id: `policy-pop-${dc.code}`, value: dc.code }));
  const actionRadios = ["shared", "dedicated"].map((value) => h("input", { type: "radio", name: "policy-action", id: `policy-action-${value}`, value }));
  actionRadios[0].checked = true;
  const locationOptions = () => locations.map((location) => h("option", { value: location.id }, `${location.id} — ${location.city} (${location.ipv4})`));
  const primary = h("select", { id: "policy-primary" }, locationOptions());
  const secondary = h("select", { id: "policy-secondary" }, locationOptions(), h("option", { value: "shared" }, "shared (leave from the shared address)"));
  const ipv6 = h("select", { id: "policy-ipv6" }, h("option", { value: "" }, "same as primary"), locationOptions());
  const position = h("select", { id: "policy-position" }, h("option", { value: "last" }, "last"), h("option", { value: "first" }, "first"));
  const dedicatedFields = h("fieldset", { id: "policy-dedicated", disabled: true },
    h("legend", {}, "Dedicated locations"),
    locations.length ? null : h("p", { class: "muted" }, "This account has no dedicated locations yet: assign some under Egress IPs."),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "policy-primary" }, "Primary (IPv4)"), primary),
      h("div", { class: "field" }, h("label", { for: "policy-secondary" }, "Secondary (failover, R11)"), secondary),
      h("div", { class: "field" }, h("label", { for: "policy-ipv6" }, "IPv6 location"), ipv6)));
  if (locations.length > 1) secondary.selectedIndex = 1;
  for (const radio of actionRadios) {
    radio.addEventListener("change", () => { dedicatedFields.disabled = !actionRadios[1].checked; });
  }
  const submit = h("button", { type: "submit", class: "primary" }, "Add policy");
  const form = h("form", { class: "card", id: "policy-form", "aria-labelledby": "add-title" },
    h("h2", { id: "add-title" }, "Add a policy"),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "policy-id" }, "Id"), idInput),
      h("div", { class: "field" }, h("label", { for: "policy-name" }, "Description"), nameInput),
      h("div", { class: "field" }, h("label", { for: "policy-position" }, "Position"), position)),
    h("fieldset", {},
      h("legend", {}, "Match (empty: any)"),
      h("div", { class: "row" },
        h("div", { class: "field" }, h("label", { for: "policy-destinations" }, "Destinations"), destinations,
          h("span", { class: "hint" }, "CIDRs and hostname patterns, separated by spaces or commas")),
        h("div", { class: "field" }, h("label", { for: "policy-ports" }, "Ports"), ports),
        h("div", { class: "field" }, h("label", { for: "policy-users" }, "Users"), usersInput),
        h("div", { class: "field" }, h("label", { for: "policy-groups" }, "Groups"), groupsInput,
          h("span", { class: "hint" }, groups.length ? `known: ${groups.map((group) => group.name).join(", ")}` : "this account has no groups"))),
      h("div", { class: "row" },
        h("fieldset", { class: "inline" }, h("legend", {}, "Protocols"),
          protocolBoxes.map((box) => h("span", { class: "toggle" }, box, h("label", { for: box.id }, box.value.toUpperCase())))),
        popBoxes.length ? h("fieldset", { class: "inline" }, h("legend", {}, "Connected PoPs"),
          popBoxes.map((box) => h("span", { class: "toggle" }, box, h("label", { for: box.id }, box.value)))) : null)),
    h("fieldset", { class: "inline" }, h("legend", {}, "Egress"),
      actionRadios.map((radio) => h("span", { class: "toggle" }, radio,
        h("label", { for: radio.id }, radio.value === "shared" ? "Shared address" : "Dedicated")))),
    dedicatedFields,
    h("div", { class: "actions" }, submit),
    formProblem.element);
  main.append(form);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formProblem.hide();
    const dedicated = actionRadios[1].checked;
    const body = {
      id: idInput.value.trim(),
      name: nameInput.value.trim(),
      destinations: words(destinations.value),
      ports: words(ports.value),
      users: words(usersInput.value),
      groups: words(groupsInput.value),
      protocols: protocolBoxes.filter((box) => box.checked).map((box) => box.value),
      connected_pops: popBoxes.filter((box) => box.checked).map((box) => box.value),
      action: dedicated ? "dedicated" : "shared",
    };
    if (dedicated) {
      body.primary = primary.value || null;
      body.secondary = secondary.value || null;
      if (ipv6.value) body.ipv6 = ipv6.value;
    }
    if (position.value === "first") body.position = 0;
    try {
      const created = await busy(submit, () => api.post(`${path}/policies`, body, { signal }));
      policies = await api.get(`${path}/policies`, { signal });
      draw();
      form.reset();
      if (locations.length > 1) secondary.selectedIndex = 1;
      actionRadios[0].checked = true;
      dedicatedFields.disabled = true;
      status.textContent = `Policy ${created.id} added at position ${created.position}.`;
      idInput.focus();
    } catch (failure) {
      if (!signal.aborted) formProblem.show(failure);
    }
  });

  draw();
  ctx.ready();
}
