// The chat page: conversations, streaming answers, keys and errors.

import * as api from "./api.js";
import { copyText, render } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  backdrop: $("backdrop"),
  menu: $("menu-button"),
  closeSidebar: $("close-sidebar"),
  newChat: $("new-chat"),
  list: $("conversation-list"),
  spend: $("spend"),
  keyButton: $("key-button"),
  keyButtonLabel: $("key-button-label"),
  title: $("chat-title"),
  model: $("model"),
  demoBanner: $("demo-banner"),
  offlineBanner: $("offline-banner"),
  scroller: $("scroller"),
  instructions: $("instructions"),
  system: $("system"),
  empty: $("empty"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  status: $("status"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyText: $("key-text"),
  keyError: $("key-error"),
  keyInput: $("key-input"),
  keyForget: $("key-forget"),
  keyCancel: $("key-cancel"),
  keySave: $("key-save"),
  confirmDialog: $("confirm-dialog"),
  confirmForm: $("confirm-form"),
  confirmText: $("confirm-text"),
  confirmCancel: $("confirm-cancel"),
};

const state = {
  ...store.load(),
  key: store.getKey(),
  models: [],
  defaultModel: null,
  demo: false,
  active: null, // {controller, conversation, message} while an answer streams
  afterKey: null, // what to do once a key is saved (retry the message that got a 401)
};

// --- small helpers -------------------------------------------------------------------

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function persist() {
  if (!store.save(state)) announce("This browser refused to save the conversation (storage is full or turned off).");
}

function announce(text) {
  ui.status.textContent = "";
  // A fresh text node each time, so screen readers repeat an identical message.
  requestAnimationFrame(() => {
    ui.status.textContent = text;
  });
}

function titleOf(conversation) {
  return conversation.title || "New chat";
}

function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const ICONS = {
  rename: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16z"/></svg>',
  delete: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13"/></svg>',
};

function iconButton(icon, label) {
  const button = el("button", "icon-button small");
  button.type = "button";
  button.setAttribute("aria-label", label);
  button.title = label;
  button.innerHTML = ICONS[icon]; // our own constant markup
  return button;
}

function plural(n, word) {
  return `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
}

// --- sidebar ------------------------------------------------------------------------

function renderList() {
  ui.list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = el("li", "conversation");
    item.dataset.id = conversation.id;
    const open = el("button", "open-conversation", titleOf(conversation));
    open.type = "button";
    if (conversation.id === state.currentId) {
      item.classList.add("current");
      open.setAttribute("aria-current", "page");
    }
    open.addEventListener("click", () => {
      switchTo(conversation.id);
      closeSidebar();
      ui.input.focus();
    });
    const rename = iconButton("rename", `Rename “${titleOf(conversation)}”`);
    rename.addEventListener("click", () => startRename(item, conversation));
    const remove = iconButton("delete", `Delete “${titleOf(conversation)}”`);
    remove.addEventListener("click", () => confirmDelete(conversation));
    item.append(open, rename, remove);
    ui.list.append(item);
  }
}

function startRename(item, conversation) {
  const field = el("input", "rename-field");
  field.type = "text";
  field.value = titleOf(conversation);
  field.setAttribute("aria-label", "Conversation name");
  field.maxLength = 120;
  item.replaceChildren(field);
  field.focus();
  field.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    const name = field.value.trim();
    if (keep && name) {
      conversation.title = name;
      conversation.renamed = true;
      persist();
      announce(`Renamed to ${name}.`);
    }
    renderList();
    if (conversation.id === state.currentId) ui.title.textContent = titleOf(conversation);
    const again = ui.list.querySelector(`[data-id="${CSS.escape(conversation.id)}"] .open-conversation`);
    if (again) again.focus();
  };
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      finish(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      finish(false);
    }
  });
  field.addEventListener("blur", () => finish(true));
}

function confirmDelete(conversation) {
  ui.confirmText.textContent = `“${titleOf(conversation)}” will be removed from this browser. This cannot be undone.`;
  ui.confirmDialog.returnValue = "";
  ui.confirmForm.onsubmit = (event) => {
    event.preventDefault();
    ui.confirmDialog.close("ok");
    deleteConversation(conversation.id);
  };
  ui.confirmDialog.showModal();
}

function deleteConversation(id) {
  if (state.active && state.active.conversation.id === id) state.active.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations[0]?.id ?? null;
  persist();
  renderAll();
  announce("Conversation deleted.");
  ui.input.focus();
}

function openSidebar() {
  ui.app.classList.add("sidebar-open");
  ui.backdrop.hidden = false;
  ui.menu.setAttribute("aria-expanded", "true");
  ui.newChat.focus();
}

function closeSidebar() {
  if (!ui.app.classList.contains("sidebar-open")) return;
  ui.app.classList.remove("sidebar-open");
  ui.backdrop.hidden = true;
  ui.menu.setAttribute("aria-expanded", "false");
}

// --- the conversation ----------------------------------------------------------------

function newChat() {
  const open = current();
  if (open && open.messages.length === 0) {
    // Already on an empty chat: nothing to create.
    closeSidebar();
    ui.input.focus();
    return;
  }
  const conversation = store.newConversation(ui.model.value || state.defaultModel);
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  persist();
  renderAll();
  closeSidebar();
  ui.input.focus();
}

function switchTo(id) {
  state.currentId = id;
  persist();
  renderAll();
}

function ensureConversation() {
  let conversation = current();
  if (!conversation) {
    conversation = store.newConversation(ui.model.value || state.defaultModel);
    state.conversations.unshift(conversation);
    state.currentId = conversation.id;
  }
  return conversation;
}

function renderAll() {
  renderList();
  const conversation = current();
  ui.title.textContent = conversation ? titleOf(conversation) : "New chat";
  ui.system.value = conversation?.system || "";
  ui.instructions.open = Boolean(conversation?.system);
  selectModel(conversation?.model);
  ui.messages.replaceChildren();
  for (const message of conversation?.messages || []) ui.messages.append(messageNode(conversation, message));
  ui.empty.hidden = Boolean(conversation && conversation.messages.length);
  updateSendButton();
  scrollToEnd(true);
}

function selectModel(model) {
  if (!state.models.length) return;
  ui.model.value = model && state.models.includes(model) ? model : state.defaultModel;
}

function messageNode(conversation, message) {
  const node = el("article", `message ${message.role}`);
  node.dataset.id = message.id;
  node.setAttribute("aria-label", message.role === "user" ? "You said" : "Assistant said");
  if (message.role === "user") {
    node.append(el("div", "bubble", message.content));
    return node;
  }
  const body = el("div", "content markdown");
  node.append(body);
  fillAssistant(node, conversation, message);
  return node;
}

/** (Re)draw an assistant message: its text, any notice, and the line under it. */
function fillAssistant(node, conversation, message) {
  const body = node.querySelector(".content");
  body.replaceChildren(render(message.content || ""));
  if (message.streaming) {
    node.setAttribute("aria-busy", "true");
    if (!message.content) body.replaceChildren(typingDots());
  } else {
    node.removeAttribute("aria-busy");
  }
  node.querySelector(".notice")?.remove();
  node.querySelector(".meta")?.remove();
  if (message.streaming) return;

  if (message.error) {
    const notice = el("div", `notice ${message.error.kind === "rate" ? "warn" : "error"}`);
    notice.setAttribute("role", "alert");
    notice.append(el("p", "", message.error.text));
    if (isLast(conversation, message)) notice.append(retryButton(message));
    node.append(notice);
  } else if (message.stopped) {
    const notice = el("div", "notice info");
    notice.append(el("p", "", "You stopped this answer."));
    if (isLast(conversation, message)) notice.append(retryButton(message, "Answer again"));
    node.append(notice);
  }

  const meta = el("div", "meta");
  const facts = [];
  if (message.model) facts.push(message.model);
  if (message.usage) {
    const u = message.usage;
    facts.push(`${plural(u.total_tokens, "token")} (${u.prompt_tokens.toLocaleString()} in, ${u.completion_tokens.toLocaleString()} out)`);
  }
  if (message.cost != null) facts.push(formatMoney(message.cost));
  const info = el("span", "usage", facts.join(" · "));
  meta.append(info);
  if (message.content) {
    const copy = el("button", "meta-button", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy answer");
    copy.addEventListener("click", async () => {
      const ok = await copyText(message.content);
      flash(copy, ok ? "Copied" : "Copy failed");
    });
    meta.append(copy);
  }
  node.append(meta);
}

function typingDots() {
  const dots = el("span", "typing");
  dots.setAttribute("aria-label", "Writing…");
  dots.append(el("span"), el("span"), el("span"));
  return dots;
}

function isLast(conversation, message) {
  return conversation.messages[conversation.messages.length - 1] === message;
}

function retryButton(message, label = "Try again") {
  const button = el("button", "retry", label);
  button.type = "button";
  const wait = message.error?.retryAt ? message.error.retryAt - Date.now() : 0;
  if (wait > 0) {
    button.disabled = true;
    setTimeout(() => {
      button.disabled = false;
    }, wait);
  }
  button.addEventListener("click", () => retryLast());
  return button;
}

function flash(button, text) {
  const before = button.textContent;
  button.textContent = text;
  button.classList.add("flashed");
  announce(text);
  setTimeout(() => {
    button.textContent = before;
    button.classList.remove("flashed");
  }, 1500);
}

function formatMoney(value) {
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (number > 0 && number < 0.01) return "under $0.01";
  return `$${number.toFixed(2)}`;
}

let stickToEnd = true;
ui.scroller.addEventListener("scroll", () => {
  const { scrollTop, scrollHeight, clientHeight } = ui.scroller;
  stickToEnd = scrollHeight - scrollTop - clientHeight < 80;
});

function scrollToEnd(force = false) {
  if (force || stickToEnd) ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

// --- sending and streaming -----------------------------------------------------------

function updateSendButton() {
  const streaming = Boolean(state.active);
  ui.send.classList.toggle("stopping", streaming);
  ui.send.setAttribute("aria-label", streaming ? "Stop" : "Send");
  ui.send.title = streaming ? "Stop (Esc)" : "Send (Enter)";
  ui.send.disabled = !streaming && !ui.input.value.trim();
}

async function send(text) {
  if (state.active || !text.trim()) return;
  const conversation = ensureConversation();
  const history = conversation.messages
    .filter((m) => m.content && (m.role === "user" || m.role === "assistant"))
    .map((m) => ({ role: m.role, content: m.content }));

  const model = ui.model.value || state.defaultModel;
  conversation.model = model;
  if (!conversation.renamed && !conversation.messages.length) conversation.title = titleFrom(text);
  const question = { id: store.newId(), role: "user", content: text };
  const answer = { id: store.newId(), role: "assistant", content: "", model, streaming: true };
  conversation.messages.push(question, answer);
  conversation.updatedAt = Date.now();
  // The conversation in use moves to the top of the list.
  state.conversations = [conversation, ...state.conversations.filter((c) => c !== conversation)];
  persist();
  renderAll();

  const controller = new AbortController();
  state.active = { controller, conversation, message: answer };
  updateSendButton();

  const body = { message: text, model };
  if (history.length) body.messages = history;
  if (conversation.system.trim()) body.system = conversation.system.trim();

  let frame = 0;
  const draw = () => {
    frame = 0;
    const node = ui.messages.querySelector(`[data-id="${answer.id}"]`);
    if (node && state.currentId === conversation.id) {
      fillAssistant(node, conversation, answer);
      scrollToEnd();
    }
  };
  let savedAt = Date.now();
  try {
    const done = await api.streamChat(body, {
      key: state.key,
      signal: controller.signal,
      onContent(piece) {
        answer.content += piece;
        if (!frame) frame = requestAnimationFrame(draw);
        if (Date.now() - savedAt > 1000) {
          savedAt = Date.now();
          persist();
        }
      },
    });
    answer.model = done.model || model;
    answer.usage = done.usage;
    if (done.cost != null) answer.cost = done.cost;
    announce("The answer is complete.");
  } catch (error) {
    if (error instanceof api.Stopped) {
      answer.stopped = true;
      announce("Stopped.");
    } else {
      const kind = error.kind || "server";
      let text = error.message || "Something went wrong.";
      if (kind === "rate" && error.retryAfter != null) text = `${text} ${retryPhrase(error.retryAfter)}`;
      if (answer.content && (kind === "stream" || kind === "cut")) text = `${text} The answer above is incomplete.`;
      answer.error = { kind, text, status: error.status || 0 };
      if (error.retryAfter != null) answer.error.retryAt = Date.now() + error.retryAfter * 1000;
      announce(text);
      if (kind === "auth") {
        state.afterKey = () => retryLast();
        openKeyDialog(state.key ? "That key was not accepted. Check it and paste it again." : "");
      }
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    delete answer.streaming;
    state.active = null;
    conversation.updatedAt = Date.now();
    persist();
    draw();
    updateSendButton();
    refreshSpend();
  }
}

function retryPhrase(seconds) {
  if (seconds <= 1) return "You can try again now.";
  if (seconds < 90) return `You can try again in ${seconds} seconds.`;
  const at = new Date(Date.now() + seconds * 1000);
  return `You can try again at ${at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}.`;
}

/** Send the last question again, replacing the answer that failed or was stopped. */
function retryLast() {
  const conversation = current();
  if (!conversation || state.active) return;
  const messages = conversation.messages;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  const question = messages.pop();
  if (!question || question.role !== "user") {
    if (question) messages.push(question);
    renderAll();
    return;
  }
  send(question.content);
}

function stop() {
  if (state.active) state.active.controller.abort();
}

// --- the access key -------------------------------------------------------------------

function openKeyDialog(problem = "") {
  const needed = Boolean(state.afterKey);
  ui.keyText.textContent = needed
    ? "This server asks for an access key before it answers. Paste the key you were given."
    : "If this server asks for an access key, paste the key you were given.";
  ui.keyError.hidden = !problem;
  ui.keyError.textContent = problem;
  ui.keyInput.value = "";
  ui.keyInput.placeholder = state.key ? "A key is saved. Paste a new one to replace it." : "Paste your key here";
  ui.keyForget.hidden = !state.key;
  ui.keySave.textContent = needed ? "Save and send" : "Save";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

function updateKeyButton() {
  ui.keyButtonLabel.textContent = state.key ? "Access key saved" : "Access key";
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) {
    ui.keyError.textContent = "Paste a key first.";
    ui.keyError.hidden = false;
    ui.keyInput.focus();
    return;
  }
  state.key = key;
  store.setKey(key);
  updateKeyButton();
  const next = state.afterKey;
  state.afterKey = null;
  ui.keyDialog.close();
  announce("Access key saved.");
  if (next) next();
  else ui.input.focus();
});
ui.keyCancel.addEventListener("click", () => ui.keyDialog.close());
ui.keyDialog.addEventListener("close", () => {
  state.afterKey = null;
});
ui.keyForget.addEventListener("click", () => {
  state.key = "";
  store.setKey("");
  updateKeyButton();
  ui.keyDialog.close();
  announce("Access key removed from this browser.");
  refreshSpend();
});
ui.keyButton.addEventListener("click", () => {
  state.afterKey = null;
  openKeyDialog();
});
ui.confirmCancel.addEventListener("click", () => ui.confirmDialog.close());

// --- spend (only when the server keeps a usage ledger) ---------------------------------

/** Best effort: the first number found under any of `names`, searched a level deep. */
function pick(object, names) {
  if (!object || typeof object !== "object") return null;
  for (const name of names) {
    const value = object[name];
    if (typeof value === "number" || (typeof value === "string" && value !== "" && !Number.isNaN(Number(value)))) {
      return Number(value);
    }
  }
  for (const value of Object.values(object)) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      const found = pick(value, names);
      if (found != null) return found;
    }
  }
  return null;
}

async function refreshSpend() {
  // Only a key's own spend means anything to its holder; without a key, or with the demo
  // model (which costs nothing), there is nothing to show.
  if (!state.key || state.demo) {
    ui.spend.hidden = true;
    return;
  }
  let data;
  try {
    data = await api.usage(state.key);
  } catch {
    ui.spend.hidden = true;
    return;
  }
  const budget = data && typeof data.budget === "object" ? data.budget : null;
  const spent = pick(budget, ["spent_usd"]) ?? pick(data, ["cost_usd", "spend_usd", "spent_usd", "cost", "spent"]);
  const left = pick(budget, ["remaining_usd"]) ?? pick(data, ["remaining_usd", "budget_remaining_usd", "remaining"]);
  const parts = [];
  if (spent != null && (spent > 0 || left != null)) parts.push(`Spent ${formatMoney(spent)}`);
  if (left != null) parts.push(`${formatMoney(left)} left`);
  ui.spend.textContent = parts.join(" · ");
  ui.spend.hidden = !parts.length;
}

// --- wiring ---------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.active) {
    stop();
    return;
  }
  const text = ui.input.value;
  if (!text.trim()) return;
  ui.input.value = "";
  updateSendButton();
  send(text);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!state.active) ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", updateSendButton);

document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (state.active && !ui.keyDialog.open && !ui.confirmDialog.open) {
    event.preventDefault();
    stop();
  } else if (ui.app.classList.contains("sidebar-open")) {
    closeSidebar();
    ui.menu.focus();
  }
});

ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest(".copy-code");
  if (!button) return;
  const code = button.closest(".code-block")?.querySelector("pre code");
  if (!code) return;
  const ok = await copyText(code.textContent);
  flash(button, ok ? "Copied" : "Copy failed");
});

ui.model.addEventListener("change", () => {
  const conversation = current();
  if (conversation) {
    conversation.model = ui.model.value;
    persist();
  }
});

let systemTimer = 0;
ui.system.addEventListener("input", () => {
  const conversation = ensureConversation();
  conversation.system = ui.system.value;
  clearTimeout(systemTimer);
  systemTimer = setTimeout(() => {
    persist();
    renderList();
  }, 300);
});

ui.newChat.addEventListener("click", newChat);
ui.menu.addEventListener("click", openSidebar);
ui.closeSidebar.addEventListener("click", () => {
  closeSidebar();
  ui.menu.focus();
});
ui.backdrop.addEventListener("click", closeSidebar);

window.addEventListener("storage", (event) => {
  // Another tab changed the saved conversations: follow it unless we are mid-answer.
  if (event.key && event.key.startsWith("chat-api.conversations") && !state.active) {
    Object.assign(state, store.load());
    renderAll();
  }
});

async function start() {
  updateKeyButton();
  renderAll();
  try {
    const [health, list] = await Promise.all([api.health(), api.models()]);
    state.demo = health.provider === "demo";
    ui.demoBanner.hidden = !state.demo;
    if (health.status === "degraded") {
      ui.offlineBanner.textContent =
        "This server has no OpenAI key set up yet, so it cannot answer. Ask whoever runs it to add one, or to start it in demo mode.";
      ui.offlineBanner.hidden = false;
    }
    state.models = list.models;
    state.defaultModel = list.default;
    ui.model.replaceChildren(...list.models.map((name) => new Option(name, name)));
    ui.model.disabled = false;
    selectModel(current()?.model);
  } catch {
    ui.offlineBanner.textContent = "Could not reach the server. Reload the page to try again.";
    ui.offlineBanner.hidden = false;
  }
  document.body.classList.add("ready");
  refreshSpend();
  if (matchMedia("(pointer: fine)").matches) ui.input.focus();
}

start();
