// The native HTTP API as the page uses it: fetch() with the API key, errors as ApiError, and the job
// events read as server-sent events from a fetch() stream (EventSource cannot send Authorization).

const KEY_STORAGE = "ldm.apiKey";

/** An answer that is not 2xx: its status, a message, the fields a 422 names, a 429's Retry-After. */
export class ApiError extends Error {
  constructor(status, message, { fields = [], retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.fields = fields; // [{field, message}] from a 422's detail[].loc
    this.retryAfter = retryAfter; // seconds, from a 429's Retry-After
  }

  static async from(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON (a proxy's error page): the status line says enough
    }
    const detail = body?.detail;
    if (response.status === 422 && Array.isArray(detail)) {
      const fields = detail.map((item) => ({ field: fieldOf(item.loc), message: item.msg }));
      const message = fields.map((f) => `${f.field}: ${f.message}`).join("; ");
      return new ApiError(422, message, { fields });
    }
    const message = typeof detail === "string" ? detail : `${response.status} ${response.statusText}`;
    const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    return new ApiError(response.status, message, { retryAfter: Number.isFinite(retry) ? retry : null });
  }
}

/** The request field a 422's `loc` names (["body", "width"] -> "width"; ["body"] -> "form"). */
function fieldOf(loc) {
  const names = (loc ?? []).filter((part) => typeof part === "string" && part !== "body");
  return names.length ? names[0] : "form";
}

export class Api {
  get key() {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  }

  set key(value) {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  }

  async fetch(path, { method = "GET", json, headers = {}, signal } = {}) {
    const init = { method, headers: { ...headers }, signal };
    if (this.key) init.headers.Authorization = `Bearer ${this.key}`;
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await ApiError.from(response);
    return response;
  }

  async json(path, options) {
    return (await this.fetch(path, options)).json();
  }

  models() {
    return this.json("/v1/models");
  }

  /** POST /v1/txt2img or /v1/img2img, answered 202 at once: {id, model, jobs: [{id, seed, location}]}. */
  submit(kind, body) {
    return this.json(`/v1/${kind}`, { method: "POST", json: body, headers: { Prefer: "respond-async" } });
  }

  job(id) {
    return this.json(jobPath(id), { headers: { Accept: "application/json" } });
  }

  async png(id) {
    return (await this.fetch(jobPath(id), { headers: { Accept: "image/png" } })).blob();
  }

  cancel(id) {
    return this.json(jobPath(id), { method: "DELETE" });
  }

  /** Follows a job's events until its stream ends; `onEvent({type, id, data})` for each. */
  async events(id, onEvent, { lastEventId = null, signal } = {}) {
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await this.fetch(`${jobPath(id)}/events`, { headers, signal });
    await readServerSentEvents(response.body, onEvent);
  }
}

function jobPath(id) {
  return `/v1/jobs/${encodeURIComponent(id)}`;
}

/** The text/event-stream format (HTML's "server-sent events"): fields until a blank line, comments
 * after ":", data lines joined with newlines; here every data is JSON. */
export async function readServerSentEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        if (event.data.length) onEvent({ type: event.type, id: event.id, data: parseData(event.data) });
        event = { type: "message", id: event.id, data: [] };
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
    }
  }
}

function parseData(lines) {
  try {
    return JSON.parse(lines.join("\n"));
  } catch {
    return { text: lines.join("\n") };
  }
}
