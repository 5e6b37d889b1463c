// The REST API client: every call carries `Authorization: Bearer <token>`; refusals are
// RFC 9457 problem documents, turned into ApiError with the API's own `detail`.

const TOKEN_KEY = "egressd.token";

export function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function storeToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, problem, path) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.field = problem.field || null;
    this.rule = problem.rule || null;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
    this.path = path;
  }

  /** "Conflict (409): 203.0.113.20 is already assigned to another account [field ipv4, rule R2]" */
  describe() {
    const where = [this.field && `field ${this.field}`, this.rule && `rule ${this.rule}`]
      .filter(Boolean).join(", ");
    return `${this.title} (${this.status}): ${this.detail}${where ? ` [${where}]` : ""}`;
  }
}

/** Text for any error a call can end with (problem, network, unexpected answer). */
export function explain(error) {
  if (error instanceof ApiError) return error.describe();
  if (error instanceof TypeError) return `cannot reach the control plane: ${error.message}`;
  return String(error && error.message ? error.message : error);
}

let onUnauthorized = () => {};

export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

export async function call(method, path, { body, query, signal, token } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") params.set(key, String(value));
    }
    const text = params.toString();
    if (text) url += `?${text}`;
  }
  const headers = { Accept: "application/json, application/problem+json" };
  const bearer = token ?? storedToken();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method, headers, signal, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const problem = typeof data === "object" && data ? data
      : { title: `HTTP ${response.status}`, detail: String(data).slice(0, 200) };
    const error = new ApiError(response.status, problem, path);
    if (response.status === 401 && token === undefined) onUnauthorized(error);
    throw error;
  }
  return data;
}

export const api = {
  get: (path, options) => call("GET", path, options),
  post: (path, body, options) => call("POST", path, { ...options, body }),
  put: (path, body, options) => call("PUT", path, { ...options, body }),
  patch: (path, body, options) => call("PATCH", path, { ...options, body }),
  del: (path, options) => call("DELETE", path, options),
};

export const enc = encodeURIComponent;
