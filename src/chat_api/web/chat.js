// Sending a message and streaming its answer; Regenerate and "edit and send again".
//
// One answer is written at a time. Its text is drawn at most once per frame, and only
// its unfinished end is parsed again (live-markdown.js); a frame draws at most
// CHARS_PER_FRAME new characters, so a burst (or a tab coming back from the background)
// is caught up over a few frames instead of one long one. Every draw is recorded as a
// User Timing measure, DRAW, which the browser tests read.

import * as api from "./api.js";
import { announce } from "./dom.js";
import { history, newId, titleFrom } from "./store.js";

export const DRAW = "chat-api: draw answer";
const CHARS_PER_FRAME = 2000;
const CHARS_PER_TOKEN = 4; // a fair rough guess for English text
const SAVE_EVERY_MS = 1000;

export class Chat {
  /**
   * store: ConversationStore; thread: Thread; keys: KeyDialog;
   * hooks: {model(): string, save(), changed(conversation)} — `changed` runs when an answer
   * starts and when it ends, for the rest of the page to follow (list, title, buttons).
   */
  constructor({ store, thread, keys, hooks }) {
    this.store = store;
    this.thread = thread;
    this.keys = keys;
    this.hooks = hooks;
    this.active = null; // {controller, conversation, answer} while an answer is written
  }

  get busy() {
    return this.active !== null;
  }

  /** Ask `text` at the end of the open conversation. */
  send(text) {
    if (this.busy || !text.trim()) return;
    this.#ask(this.store.ensure(this.hooks.model()), text);
  }

  /** Ask the last question again, in place of its answer. */
  regenerate() {
    const messages = this.store.current?.messages || [];
    const question = messages.findLast((m) => m.role === "user");
    if (question) this.resend(question, question.content);
  }

  /** Send `message` again as `text`: it and everything after it are replaced. */
  resend(message, text) {
    const conversation = this.store.current;
    const index = conversation ? conversation.messages.indexOf(message) : -1;
    if (this.busy || index < 0 || !text.trim()) return;
    conversation.messages.splice(index);
    this.thread.prune(conversation);
    this.#ask(conversation, text);
  }

  stop() {
    this.active?.controller.abort();
  }

  /** Stop the answer being written in conversation `id`, if any (it is being deleted). */
  stopIn(id) {
    if (this.active?.conversation.id === id) this.stop();
  }

  async #ask(conversation, text) {
    const model = this.hooks.model();
    const body = { message: text, model };
    const earlier = history(conversation);
    if (earlier.length) body.messages = earlier;
    if (conversation.system.trim()) body.system = conversation.system.trim();

    conversation.model = model;
    if (!conversation.renamed && !conversation.messages.length) conversation.title = titleFrom(text);
    const question = { id: newId(), role: "user", content: text };
    const answer = { id: newId(), role: "assistant", content: "", model, streaming: true };
    conversation.messages.push(question, answer);
    this.store.touch(conversation);
    this.thread.add(question);
    this.thread.add(answer);
    const controller = new AbortController();
    this.active = { controller, conversation, answer };
    this.hooks.save();
    this.hooks.changed(conversation);

    performance.clearMeasures(DRAW);
    let frame = 0;
    let shown = 0; // characters of the answer drawn so far
    let caughtUp = null; // once the stream ended: called when everything is drawn
    const draw = () => {
      frame = 0;
      const length = answer.content.length;
      let end = Math.min(length, shown + CHARS_PER_FRAME);
      if (end < length && isHighSurrogate(answer.content.charCodeAt(end - 1))) end -= 1;
      if (this.thread.shows(answer)) {
        const start = performance.now();
        const parsed = this.thread.write(answer, end);
        if (parsed) performance.measure(DRAW, { start, detail: { parsed, length: end } });
      } else {
        end = length; // another conversation is open; this one is drawn whole when opened
      }
      shown = end;
      if (shown < length) frame = requestAnimationFrame(draw);
      else caughtUp?.();
    };
    let savedAt = Date.now();
    try {
      const done = await api.streamChat(body, {
        key: this.keys.key,
        signal: controller.signal,
        onContent: (piece) => {
          answer.content += piece;
          if (!frame) frame = requestAnimationFrame(draw);
          if (Date.now() - savedAt > SAVE_EVERY_MS) {
            savedAt = Date.now();
            this.hooks.save();
          }
        },
      });
      answer.model = done.model || model;
      answer.usage = done.usage;
      if (done.cost != null) answer.cost = done.cost;
      announce("The answer is complete.");
    } catch (error) {
      this.#failed(answer, body, error);
    } finally {
      delete answer.streaming;
      conversation.updatedAt = Date.now();
      this.hooks.save();
      if (shown < answer.content.length) {
        await new Promise((resolve) => {
          caughtUp = resolve;
          if (!frame) frame = requestAnimationFrame(draw);
        });
      }
      if (frame) cancelAnimationFrame(frame);
      this.active = null;
      this.thread.settle(answer);
      this.hooks.changed(conversation);
    }
  }

  #failed(answer, body, error) {
    if (error instanceof api.Stopped) {
      answer.stopped = true;
      estimateUsage(answer, body);
      announce("Stopped.");
      return;
    }
    const kind = error.kind || "server";
    let text = error.message || "Something went wrong.";
    if (kind === "rate" && error.retryAfter != null) text = `${text} ${retryPhrase(error.retryAfter)}`;
    if (answer.content && (kind === "stream" || kind === "cut")) {
      text = `${text} The answer above is incomplete.`;
      estimateUsage(answer, body);
    }
    answer.error = { kind, text, status: error.status || 0 };
    if (error.retryAfter != null) answer.error.retryAt = Date.now() + error.retryAfter * 1000;
    announce(text);
    if (kind === "auth") this.keys.rejected(() => this.regenerate());
  }
}

function isHighSurrogate(code) {
  return code >= 0xd800 && code <= 0xdbff;
}

/** The server counts tokens only for answers it finished: guess the rest from their length. */
function estimateUsage(answer, body) {
  const read = [body.system || "", ...(body.messages || []).map((m) => m.content), body.message];
  const prompt = Math.ceil(read.join("").length / CHARS_PER_TOKEN) + 4 * read.length;
  const completion = Math.ceil(answer.content.length / CHARS_PER_TOKEN);
  answer.usage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
  answer.usageEstimated = true;
}

function retryPhrase(seconds) {
  if (seconds <= 1) return "You can try again now.";
  if (seconds < 90) return `You can try again in ${seconds} seconds.`;
  const at = new Date(Date.now() + seconds * 1000);
  return `You can try again at ${at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}.`;
}
