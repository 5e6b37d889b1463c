// Devices: the account's device credentials, enrollment (a single-use token shown once)
// and the users devices belong to.

import { api, enc } from "../api.js";
import { busy, confirmAction, emptyRow, heading, problemBox, table } from "../common.js";
import { clear, h, time } from "../dom.js";

export async function render(ctx) {
  const { main, signal, accountId } = ctx;
  const path = `/v1/accounts/${enc(accountId)}`;
  const deviceBox = h("div");
  const tokenBox = h("div");
  const userBox = h("div");
  const status = h("p", { class: "status", role: "status", id: "devices-status" });
  const listProblem = problemBox();
  const enrollProblem = problemBox();
  const userProblem = problemBox();
  const shownOnce = h("div", { id: "enrollment-secret", "aria-live": "polite" });
  const userSelect = h("select", { id: "enroll-user", required: true });
  const expires = h("input", { id: "enroll-expires", type: "number", min: 1, max: 10080, value: "60", size: 6 });
  const enrollButton = h("button", { type: "submit", class: "primary" }, "Create enrollment token");
  const newUser = h("input", { id: "user-name", required: true, size: 18, spellcheck: "false", pattern: "[A-Za-z0-9][A-Za-z0-9._@-]{0,99}" });
  const addUserButton = h("button", { type: "submit" }, "Add user");

  const enrollForm = h("form", { class: "card", id: "enroll", "aria-labelledby": "enroll-title" },
    h("h2", { id: "enroll-title" }, "Enroll a device"),
    h("p", { class: "muted" }, "A single-use token with which one device of the user enrolls itself (POST /v1/enroll) and receives its proxy credentials. The token is shown once."),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "enroll-user" }, "User"), userSelect),
      h("div", { class: "field" }, h("label", { for: "enroll-expires" }, "Expires in (minutes)"), expires)),
    h("div", { class: "actions" }, enrollButton),
    enrollProblem.element,
    shownOnce);
  const userForm = h("form", { class: "card", id: "add-user", "aria-labelledby": "users-title" },
    h("h2", { id: "users-title" }, "Users"),
    userBox,
    h("div", { class: "row" }, h("div", { class: "field" }, h("label", { for: "user-name" }, "New user"), newUser),
      h("div", { class: "actions" }, addUserButton)),
    userProblem.element);

  main.append(
    heading("Devices", accountId),
    status,
    listProblem.element,
    h("section", { class: "card", "aria-labelledby": "devices-title" }, h("h2", { id: "devices-title" }, "Devices"), deviceBox),
    enrollForm,
    h("section", { class: "card", "aria-labelledby": "tokens-title" }, h("h2", { id: "tokens-title" }, "Enrollment tokens"), tokenBox),
    userForm);

  async function load() {
    const [devices, users, tokens] = await Promise.all([
      api.get(`${path}/devices`, { signal }),
      api.get(`${path}/users`, { signal }),
      api.get(`${path}/enrollment-tokens`, { signal }),
    ]);
    clear(deviceBox).append(table(null, ["Device (proxy user name)", "User", "Created", "Actions"], devices.length
      ? devices.map((device) => {
        const remove = h("button", { type: "button", class: "danger", "aria-label": `Delete device ${device.id}` }, "Delete");
        remove.addEventListener("click", () => removeDevice(device, remove));
        return h("tr", { "data-device": device.id }, h("th", { scope: "row", class: "mono" }, device.id), h("td", {}, device.user),
          h("td", {}, time(device.created_at)), h("td", { class: "row-actions" }, remove));
      })
      : [emptyRow(4, "No devices. Enroll one below.")]));
    const chosen = userSelect.value;
    clear(userSelect).append(...(users.length ? users.map((user) => h("option", { value: user.name }, user.name))
      : [h("option", { value: "" }, "no users: add one below")]));
    if (users.some((user) => user.name === chosen)) userSelect.value = chosen;
    enrollButton.disabled = users.length === 0;
    clear(userBox).append(table(null, ["User", "Groups", "Devices"], users.length
      ? users.map((user) => h("tr", {}, h("th", { scope: "row" }, user.name), h("td", {}, user.groups.join(", ") || "–"), h("td", {}, String(user.devices.length))))
      : [emptyRow(3, "No users.")]));
    clear(tokenBox).append(table(null, ["Id", "User", "Status", "Expires", "Used by", "Actions"], tokens.length
      ? tokens.map((token) => {
        const actions = [];
        if (token.status === "unused") {
          const revoke = h("button", { type: "button", class: "danger", "aria-label": `Revoke enrollment token ${token.id}` }, "Revoke");
          revoke.addEventListener("click", () => revokeToken(token, revoke));
          actions.push(revoke);
        }
        const kind = { unused: "info", used: "ok", expired: "down" }[token.status];
        return h("tr", {}, h("th", { scope: "row", class: "mono" }, token.id), h("td", {}, token.user),
          h("td", {}, h("span", { class: `badge badge-${kind}` }, token.status)), h("td", {}, time(token.expires_at)),
          h("td", { class: "mono" }, token.used_by_device || "–"), h("td", { class: "row-actions" }, actions));
      })
      : [emptyRow(6, "No enrollment tokens.")]));
  }

  async function removeDevice(device, button) {
    const ok = await confirmAction({ title: `Delete device ${device.id}?`, body: "The PoPs refuse its credentials from the next configuration version on (within 2 seconds).", confirm: "Delete" });
    if (!ok) {
      button.focus();
      return;
    }
    listProblem.hide();
    try {
      await busy(button, () => api.del(`${path}/devices/${enc(device.id)}`, { signal }));
      await load();
      status.textContent = `Device ${device.id} deleted.`;
      main.querySelector("h1").focus();
    } catch (failure) {
      if (!signal.aborted) listProblem.show(failure);
    }
  }

  async function revokeToken(token, button) {
    listProblem.hide();
    try {
      await busy(button, () => api.del(`${path}/enrollment-tokens/${enc(token.id)}`, { signal }));
      await load();
      status.textContent = `Enrollment token ${token.id} revoked.`;
      main.querySelector("h1").focus();
    } catch (failure) {
      if (!signal.aborted) listProblem.show(failure);
    }
  }

  enrollForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    enrollProblem.hide();
    clear(shownOnce);
    try {
      const created = await busy(enrollButton, () => api.post(`${path}/enrollment-tokens`,
        { user: userSelect.value, expires_in_minutes: Number(expires.value) || 60 }, { signal }));
      const secret = h("input", { id: "enrollment-token", class: "mono secret", readonly: true, value: created.token, size: 60, "aria-describedby": "enrollment-once" });
      const copy = h("button", { type: "button" }, "Copy");
      copy.addEventListener("click", async () => {
        secret.select();
        try {
          await navigator.clipboard.writeText(created.token);
          copy.textContent = "Copied";
        } catch {
          copy.textContent = "Selected: press Ctrl+C";
        }
      });
      const dismiss = h("button", { type: "button" }, "Done: hide it");
      dismiss.addEventListener("click", () => {
        clear(shownOnce);
        enrollButton.focus();
      });
      const command = `curl -sS -X POST ${location.origin}/v1/enroll -H 'content-type: application/json' -d '{"token": "<token>"}'`;
      shownOnce.append(h("div", { class: "banner banner-warn" },
        h("p", { id: "enrollment-once" }, h("strong", {}, "Shown once: "), `enrollment token for ${created.user}, single use, expires `, time(created.expires_at),
          ". Copy it now; only its hash is kept."),
        h("div", { class: "row" }, h("label", { for: "enrollment-token", class: "visually-hidden" }, "Enrollment token"), secret, copy, dismiss),
        h("p", { class: "muted" }, "The device enrolls with: ", h("code", {}, command))));
      secret.focus();
      secret.select();
      await load();
    } catch (failure) {
      if (!signal.aborted) enrollProblem.show(failure);
    }
  });

  userForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    userProblem.hide();
    try {
      const user = await busy(addUserButton, () => api.post(`${path}/users`, { name: newUser.value.trim() }, { signal }));
      newUser.value = "";
      await load();
      userSelect.value = user.name;
      status.textContent = `User ${user.name} added.`;
    } catch (failure) {
      if (!signal.aborted) userProblem.show(failure);
    }
  });

  await load();
  ctx.ready();
}
