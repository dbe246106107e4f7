// The chat page: builds its parts and connects them. Where things are:
//
//   store.js        the conversation store: what is kept in this browser
//   api.js          the API client: talking to the server
//   chat.js         sending a message and streaming its answer; regenerate; edit and resend
//   messages.js     message rendering (with live-markdown.js and markdown.js for answers)
//   composer.js     the message box;  sidebar.js  the conversation list and search
//   key-dialog.js   the access key;   export.js   Markdown and JSON downloads
//   spend.js, scroll.js, dom.js       the spend line, following the end, small helpers

import * as api from "./api.js";
import { Chat } from "./chat.js";
import { Composer } from "./composer.js";
import { announce, byId } from "./dom.js";
import { download } from "./export.js";
import { KeyDialog } from "./key-dialog.js";
import { warmUp } from "./markdown.js";
import { Thread } from "./messages.js";
import { FollowEnd } from "./scroll.js";
import { Sidebar } from "./sidebar.js";
import { showSpend } from "./spend.js";
import { ConversationStore, dismiss, isDismissed, titleOf } from "./store.js";

const ui = {
  app: byId("app"),
  title: byId("chat-title"),
  model: byId("model"),
  exportButton: byId("export-button"),
  exportMenu: byId("export-menu"),
  demoBanner: byId("demo-banner"),
  demoDismiss: byId("demo-dismiss"),
  offlineBanner: byId("offline-banner"),
  instructions: byId("instructions"),
  system: byId("system"),
  empty: byId("empty"),
  newChat: byId("new-chat"),
};

const server = { models: [], defaultModel: null, demo: false };
const store = new ConversationStore();
const follow = new FollowEnd(byId("scroller"), byId("messages").parentElement);
const keys = new KeyDialog((usage) => showSpend(server.demo ? null : usage));
const thread = new Thread(byId("messages"), {
  regenerate: () => chat.regenerate(),
  resend: (message, text) => chat.resend(message, text),
  busy: () => chat.busy,
});
const chat = new Chat({
  store,
  thread,
  keys,
  hooks: {
    model: () => ui.model.value || server.defaultModel,
    save,
    changed(conversation) {
      composer.setBusy(chat.busy);
      ui.app.classList.toggle("busy", chat.busy);
      sidebar.render();
      if (conversation === store.current) showHeader(conversation);
      if (chat.busy) follow.toEnd(); // the new answer is at the end
      else refreshSpend();
    },
  },
});
const composer = new Composer({ send: (text) => chat.send(text), stop: () => chat.stop() });
const sidebar = new Sidebar(store, {
  open(id) {
    store.open(id);
    save();
    showConversation();
  },
  remove(id) {
    chat.stopIn(id);
    store.remove(id);
    save();
    showConversation();
    announce("Conversation deleted.");
    composer.focus();
  },
  renamed(conversation) {
    save();
    if (conversation === store.current) showHeader(conversation);
  },
});

function save() {
  if (!store.save()) announce("This browser refused to save the conversation (storage is full or turned off).");
}

/** The open conversation's title, empty-state and Export button (not its messages). */
function showHeader(conversation) {
  ui.title.textContent = titleOf(conversation);
  const said = Boolean(conversation?.messages.length);
  ui.empty.hidden = said;
  ui.exportButton.hidden = !said;
}

/** Draw the open conversation from scratch: on load and when another one is opened. */
function showConversation() {
  const conversation = store.current;
  sidebar.render();
  showHeader(conversation);
  ui.system.value = conversation?.system || "";
  ui.instructions.open = Boolean(conversation?.system);
  selectModel(conversation?.model);
  thread.show(conversation);
  follow.toEnd();
}

function selectModel(model) {
  if (!server.models.length) return;
  ui.model.value = model && server.models.includes(model) ? model : server.defaultModel;
}

async function refreshSpend() {
  // Only a key's own spend means anything to its holder; the demo model costs nothing.
  if (!keys.enabled || !keys.key || server.demo) return showSpend(null);
  try {
    showSpend(await api.usage(keys.key));
  } catch {
    showSpend(null);
  }
}

function newChat() {
  if (store.current && !store.current.messages.length) {
    // Already on an empty chat: nothing to create.
  } else {
    store.create(ui.model.value || server.defaultModel);
    save();
    showConversation();
  }
  sidebar.hide();
  composer.focus();
}

// --- wiring -----------------------------------------------------------------------------

ui.newChat.addEventListener("click", newChat);

ui.model.addEventListener("change", () => {
  const conversation = store.current;
  if (conversation) {
    conversation.model = ui.model.value;
    save();
  }
});

let systemTimer = 0;
ui.system.addEventListener("input", () => {
  const conversation = store.ensure(ui.model.value || server.defaultModel);
  conversation.system = ui.system.value;
  clearTimeout(systemTimer);
  systemTimer = setTimeout(() => {
    save();
    sidebar.render();
  }, 300);
});

ui.exportMenu.addEventListener("click", (event) => {
  const item = event.target.closest("[data-format]");
  if (!item || !store.current) return;
  ui.exportMenu.hidePopover();
  download(store.current, item.dataset.format);
  announce("Conversation exported.");
});

ui.demoDismiss.addEventListener("click", () => {
  dismiss("demo-banner");
  ui.demoBanner.hidden = true;
  composer.focus();
});

document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || document.querySelector("dialog[open]")) return;
  if (chat.busy) {
    event.preventDefault();
    chat.stop();
  } else if (sidebar.isOpen) {
    sidebar.hide();
    byId("menu-button").focus();
  }
});

window.addEventListener("storage", (event) => {
  // Another tab changed the saved conversations: follow it unless we are mid-answer.
  if (event.key && event.key.startsWith("chat-api.conversations") && !chat.busy) {
    store.reload();
    showConversation();
  }
});

async function start() {
  showConversation();
  try {
    const [config, health, list] = await Promise.all([api.pageConfig(), api.health(), api.models()]);
    server.demo = config.demo;
    ui.demoBanner.hidden = !config.demo || isDismissed("demo-banner");
    if (health.status === "degraded") {
      ui.offlineBanner.textContent =
        "This server has no OpenAI key set up yet, so it cannot answer. Ask whoever runs it to add one, or to start it in demo mode.";
      ui.offlineBanner.hidden = false;
    }
    server.models = list.models;
    server.defaultModel = list.default;
    ui.model.replaceChildren(...list.models.map((name) => new Option(name, name)));
    ui.model.disabled = false;
    selectModel(store.current?.model);
    document.body.classList.add("ready");
    if (config.keys) await keys.start();
  } catch {
    ui.offlineBanner.textContent = "Could not reach the server. Reload the page to try again.";
    ui.offlineBanner.hidden = false;
  }
  if (matchMedia("(pointer: fine)").matches && !document.querySelector("dialog[open]")) composer.focus();
  warmUp();
}

start();
