// The live flow feed: GET /v1/flows as a long poll (fetch + AbortController: EventSource
// cannot send the Authorization header). The first request returns the recent backlog at
// once (wait=0); each next one waits up to 25 s for newer flows than the last `next`.

import { api } from "./api.js";
import { sleep } from "./dom.js";

export async function tail({ filters = {}, signal, onFlows, onStatus = () => {}, backlog = 200 }) {
  let after = 0;
  let first = true;
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const page = await api.get("/v1/flows", {
        query: { ...filters, after, wait: first ? 0 : 25, limit: first ? backlog : 1000 }, signal,
      });
      if (signal.aborted) return;
      after = page.next;
      onStatus({ state: "live" });
      onFlows(page.flows, first);
      first = false;
      delay = 1000;
    } catch (failure) {
      if (signal.aborted) return;
      onStatus({ state: "error", error: failure, retryMs: delay });
      if (first) {
        onFlows([], true);
        first = false;
      }
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 15000);
    }
  }
}

export const OUTCOMES = ["ok", "refused", "auth-failed", "upstream-error", "protocol-error", "client-error", "connection-error"];
