// Message rendering: the conversation on screen, one <article> per message.
//
// A message is drawn once, when it is added. The answer being written is updated
// through its LiveMarkdown, and gets its footer (usage, notices, buttons) when it
// ends. What the buttons do is decided elsewhere (chat.js), through `actions`.

import { announce, button, copyText, el, flash, formatMoney, formatNumber, plural } from "./dom.js";
import { LiveMarkdown } from "./live-markdown.js";

export class Thread {
  /** actions: {regenerate(), resend(message, text), busy()} */
  constructor(root, actions) {
    this.root = root;
    this.actions = actions;
    this.views = new Map(); // message id → {node, live, dots, settled}
    root.addEventListener("click", (event) => this.#copyCode(event));
  }

  /** Draw `conversation` (or nothing) in place of what is shown. */
  show(conversation) {
    this.root.replaceChildren();
    this.views.clear();
    for (const message of conversation?.messages || []) this.add(message);
  }

  add(message) {
    const node = message.role === "user" ? this.#question(message) : this.#answer(message);
    this.root.append(node);
  }

  /** Take away the messages no longer in `conversation` (after an edit or a regenerate). */
  prune(conversation) {
    const kept = new Set(conversation.messages.map((m) => m.id));
    for (const [id, view] of this.views) {
      if (kept.has(id)) continue;
      view.node.remove();
      this.views.delete(id);
    }
  }

  /** Whether `message` is on screen. */
  shows(message) {
    return this.views.has(message.id);
  }

  /** Draw the first `length` characters of an answer being written; returns how many were parsed. */
  write(message, length = message.content.length) {
    const view = this.views.get(message.id);
    if (!view || !length) return 0;
    if (view.dots) {
      view.dots.remove();
      view.dots = null;
    }
    return view.live.show(message.content.slice(0, length));
  }

  /** The answer ended (complete, stopped or failed; its text is written): say so under it. */
  settle(message) {
    const view = this.views.get(message.id);
    if (!view || view.settled) return; // (drawn whole, when opened again after it ended)
    view.dots?.remove();
    view.dots = null;
    view.node.removeAttribute("aria-busy");
    view.node.append(...footer(message, this.actions));
    view.settled = true;
  }

  #question(message) {
    const node = el("article", "message user");
    node.dataset.id = message.id;
    node.setAttribute("aria-label", "You said");
    const bubble = el("div", "bubble", message.content);
    const edit = button("meta-button", "Edit", "Edit message");
    edit.addEventListener("click", () => this.#edit(node, bubble, message));
    const actions = el("div", "message-actions");
    actions.append(edit);
    node.append(bubble, actions);
    this.views.set(message.id, { node });
    return node;
  }

  /** Turn a question into a box to change it and send it again. */
  #edit(node, bubble, message) {
    if (this.actions.busy()) return;
    const form = el("form", "edit-form");
    const field = el("textarea", "edit-field");
    field.value = message.content;
    field.rows = 3;
    field.setAttribute("aria-label", "Edit your message");
    const note = el("p", "edit-note", "Sending replaces this message and everything after it.");
    const cancel = button("button-ghost", "Cancel");
    const send = el("button", "button-primary", "Send");
    send.type = "submit";
    const row = el("div", "edit-actions");
    row.append(note, cancel, send);
    form.append(field, row);
    const actions = node.querySelector(".message-actions");
    bubble.replaceWith(form);
    actions.hidden = true;
    field.focus();
    field.setSelectionRange(field.value.length, field.value.length);

    const close = () => {
      form.replaceWith(bubble);
      actions.hidden = false;
      actions.querySelector("button").focus();
    };
    cancel.addEventListener("click", close);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = field.value;
      if (!text.trim() || this.actions.busy()) return;
      this.actions.resend(message, text);
    });
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      } else if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        close();
      }
    });
  }

  #answer(message) {
    const node = el("article", "message assistant");
    node.dataset.id = message.id;
    node.setAttribute("aria-label", "Assistant said");
    const body = el("div", "content markdown");
    node.append(body);
    const view = { node, live: new LiveMarkdown(body), dots: null, settled: !message.streaming };
    this.views.set(message.id, view);
    if (message.streaming) {
      node.setAttribute("aria-busy", "true");
      view.dots = typingDots();
      node.append(view.dots);
      this.write(message);
    } else {
      if (message.content) view.live.show(message.content);
      node.append(...footer(message, this.actions));
    }
    return node;
  }

  async #copyCode(event) {
    const copy = event.target.closest(".copy-code");
    const code = copy?.closest(".code-block")?.querySelector("pre code");
    if (!code) return;
    const ok = await copyText(code.textContent);
    flash(copy, ok ? "Copied" : "Copy failed");
  }
}

/** What goes under a finished answer: a notice if it did not end well, then its facts and buttons. */
function footer(message, actions) {
  const parts = [];
  if (message.error) {
    const notice = el("div", `notice ${message.error.kind === "rate" ? "warn" : "error"}`);
    notice.setAttribute("role", "alert");
    notice.append(el("p", "", message.error.text), retryButton(message, actions));
    parts.push(notice);
  } else if (message.stopped) {
    const notice = el("div", "notice info");
    notice.append(el("p", "", "You stopped this answer."));
    parts.push(notice);
  }

  const meta = el("div", "meta");
  meta.append(el("span", "usage", usageText(message)));
  if (message.content) {
    const copy = button("meta-button", "Copy", "Copy answer");
    copy.addEventListener("click", async () => {
      const ok = await copyText(message.content);
      flash(copy, ok ? "Copied" : "Copy failed");
    });
    meta.append(copy);
  }
  if (!message.error) {
    // Only the last answer can be asked again (CSS hides the others' button).
    const again = button("meta-button last-only", "Regenerate", "Regenerate answer");
    again.addEventListener("click", () => actions.regenerate());
    meta.append(again);
  }
  parts.push(meta);
  return parts;
}

function usageText(message) {
  const facts = [];
  if (message.model) facts.push(message.model);
  const usage = message.usage;
  if (usage) {
    const counts = `${formatNumber(usage.prompt_tokens)} in, ${formatNumber(usage.completion_tokens)} out`;
    facts.push(
      message.usageEstimated
        ? `about ${plural(usage.total_tokens, "token")} (${counts}, estimated)`
        : `${plural(usage.total_tokens, "token")} (${counts})`,
    );
  }
  if (message.cost != null) facts.push(formatMoney(message.cost));
  return facts.join(" · ");
}

function retryButton(message, actions) {
  const retry = button("retry last-only", "Try again");
  const wait = message.error.retryAt ? message.error.retryAt - Date.now() : 0;
  if (wait > 0) {
    retry.disabled = true;
    setTimeout(() => {
      retry.disabled = false;
      announce("You can try again now.");
    }, wait);
  }
  retry.addEventListener("click", () => actions.regenerate());
  return retry;
}

function typingDots() {
  const dots = el("span", "typing");
  dots.setAttribute("aria-label", "Writing…");
  dots.append(el("span"), el("span"), el("span"));
  return dots;
}
