// The API client: /page/config, /health, /models, /usage and the /chat/stream event stream.

/** A failed answer, with what the page needs to say about it in plain words. */
export class ChatError extends Error {
  constructor(kind, message, { status = 0, retryAfter = null } = {}) {
    super(message);
    this.kind = kind; // "auth" | "rate" | "server" | "network" | "stream" | "cut"
    this.status = status;
    this.retryAfter = retryAfter; // seconds, or null
  }
}

/** The reader pressed Stop (or Esc). Not an error. */
export class Stopped extends Error {
  constructor() {
    super("Stopped");
  }
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(path, key) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json", ...authHeaders(key) } });
  } catch {
    throw new ChatError("network", "Could not reach the server. Check your connection and try again.");
  }
  if (!response.ok) throw await errorFrom(response, key);
  return response.json();
}

/** `{keys, demo}`: whether this server asks for access keys, and whether it runs the demo model. */
export const pageConfig = () => getJSON("/page/config");
export const health = () => getJSON("/health");
export const models = () => getJSON("/models");
/** What `key` spent and has left; rejects with kind "auth" when the server does not accept the key. */
export const usage = (key) => getJSON("/usage", key);

/** Seconds to wait from a Retry-After header: a number of seconds or an HTTP date. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

// The server's 401 speaks to developers ("Send it as 'Authorization: Bearer <key>'"); people get these.
export const KEY_NEEDED = "This server needs an access key before it answers. Paste the key you were given.";
export const KEY_REJECTED =
  "That key was not accepted. Check that you pasted all of it, or ask whoever runs this server for a new one.";

const FALLBACK = {
  400: "The server could not accept this message.",
  413: "This conversation is too long for the server. Start a new chat.",
  429: "Too many requests right now.",
  502: "The model's service had a problem. Try again in a moment.",
  503: "The server is not ready to answer yet.",
  504: "The model took too long to answer. Try again.",
};

async function errorFrom(response, key) {
  if (response.status === 401) return new ChatError("auth", key ? KEY_REJECTED : KEY_NEEDED, { status: 401 });
  let message = "";
  try {
    const body = await response.json();
    const error = body && body.error;
    message = typeof error === "string" ? error : (error && error.message) || "";
  } catch {
    // not JSON: fall back to a sentence for the status
  }
  const status = response.status;
  message = message || FALLBACK[status] || `The server answered with an error (${status}).`;
  const kind = status === 429 ? "rate" : "server";
  return new ChatError(kind, message, { status, retryAfter: parseRetryAfter(response.headers.get("Retry-After")) });
}

/**
 * Send one message and read the answer as it is written.
 * Calls onContent(text) for every piece; resolves with {model, usage} when done.
 * Rejects with Stopped when `signal` aborts, ChatError otherwise.
 */
export async function streamChat(body, { key, signal, onContent }) {
  let response;
  try {
    response = await fetch("/chat/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders(key) },
      body: JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (signal.aborted) throw new Stopped();
    throw new ChatError("network", "Could not reach the server. Check your connection and try again.");
  }
  if (!response.ok) throw await errorFrom(response, key);

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (signal.aborted) throw new Stopped();
        throw new ChatError("cut", "The connection broke before the answer finished.");
      }
      if (chunk.done) break;
      buffer += chunk.value;
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a keep-alive comment
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          continue;
        }
        if (typeof event.content === "string") onContent(event.content);
        else if (event.done) return { model: event.model, usage: event.usage || null, cost: event.cost_usd ?? event.cost ?? null };
        else if (event.error) throw new ChatError("stream", String(event.error));
      }
    }
  } finally {
    reader.releaseLock();
  }
  if (signal.aborted) throw new Stopped();
  throw new ChatError("cut", "The answer was cut off before it finished.");
}
