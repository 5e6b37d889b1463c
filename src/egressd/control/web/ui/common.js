// Pieces every page uses: the page heading, error boxes that show the API's problem
// document, a confirmation dialog, and a button that is disabled while its call runs.

import { ApiError, explain } from "./api.js";
import { clear, h } from "./dom.js";

export function heading(title, accountId) {
  return h("h1", { tabindex: "-1" }, title, accountId ? h("span", { class: "subject" }, ` — ${accountId}`) : null);
}

/** A role=alert box that shows an error with the API's detail, field, rule and sub-errors. */
export function problemBox() {
  const box = h("div", { class: "problem", role: "alert", hidden: true });
  return {
    element: box,
    show(error) {
      clear(box);
      box.hidden = false;
      const title = error instanceof ApiError ? `${error.title} (${error.status})` : "Error";
      const detail = error instanceof ApiError ? error.detail : explain(error);
      const where = error instanceof ApiError
        ? [error.field && `field ${error.field}`, error.rule && `rule ${error.rule}`].filter(Boolean).join(", ") : "";
      box.append(h("strong", {}, `${title}: `), detail, where ? h("span", { class: "muted" }, ` [${where}]`) : null);
      const more = error instanceof ApiError ? error.errors.slice(1) : [];
      if (more.length) {
        box.append(h("ul", {}, more.map((issue) => h("li", {}, h("code", {}, issue.field || "?"), `: ${issue.detail}`))));
      }
    },
    hide() {
      box.hidden = true;
      clear(box);
    },
  };
}

/** A polite status line ("Saved.") */
export function statusLine(className = "status") {
  return h("p", { class: className, role: "status" });
}

/** Runs `work` with the button disabled and marked busy; returns its result. */
export async function busy(button, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** A modal confirmation (native <dialog>: focus is trapped, Escape cancels). */
export function confirmAction({ title, body, confirm = "Confirm", danger = true }) {
  return new Promise((resolve) => {
    const cancelButton = h("button", { type: "button" }, "Cancel");
    const okButton = h("button", { type: "button", class: danger ? "danger" : "primary" }, confirm);
    const titleId = `dlg-${Date.now()}`;
    const dialog = h("dialog", { "aria-labelledby": titleId, class: "card" },
      h("h2", { id: titleId }, title),
      ...(Array.isArray(body) ? body : [body]).map((line) => (line instanceof Node ? line : h("p", {}, line))),
      h("div", { class: "actions" }, cancelButton, okButton));
    const finish = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    cancelButton.addEventListener("click", () => finish(false));
    okButton.addEventListener("click", () => finish(true));
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finish(false);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancelButton.focus();
  });
}

export function emptyRow(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}

export function table(caption, headers, rows, { className = "grid" } = {}) {
  return h("table", { class: className },
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((label) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, rows));
}

export const DEDICATED_TEXT = {
  active: "active",
  "needs-second-city": "needs a second city",
  none: "none",
};

/** The account's R2 state as a banner. */
export function dedicatedBanner(account) {
  const dedicated = account.dedicated;
  const kind = dedicated.status === "active" ? "ok" : dedicated.status === "none" ? "info" : "warn";
  const label = DEDICATED_TEXT[dedicated.status] || dedicated.status;
  const consequence = {
    active: "Flows use the dedicated addresses according to Settings › Network and the policies.",
    "needs-second-city": account.plan === "enterprise"
      ? "Until active locations exist in two different cities, every flow leaves from the PoPs' shared addresses (R1, R2)."
      : "Dedicated egress IPs are for enterprise accounts only (R2).",
    none: account.plan === "enterprise"
      ? "No dedicated locations: flows leave from the PoPs' shared addresses (R1). Assign addresses in two cities to activate dedicated egress."
      : "Free plan: flows leave from the PoPs' shared addresses (R1). Dedicated egress IPs are for enterprise accounts (R2).",
  }[dedicated.status] || "";
  return h("div", { class: `banner banner-${kind}`, id: "dedicated-status", "data-status": dedicated.status },
    h("p", {}, h("strong", {}, "Dedicated egress: "), h("span", { class: "state" }, label), ` — ${dedicated.detail}.`),
    h("p", { class: "muted" }, consequence));
}
