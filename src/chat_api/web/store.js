// The conversation store: what the page keeps in this browser (localStorage).
//
// Conversations (newest first) and which one is open, the access key, and the
// notices the reader dismissed. Nothing here touches the page itself.

const CONVERSATIONS = "chat-api.conversations.v1";
const KEY = "chat-api.key";
const DISMISSED = "chat-api.dismissed.";

export function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export function titleOf(conversation) {
  return conversation?.title || "New chat";
}

/** A conversation's title from its first message: one line, at most 48 characters. */
export function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function newConversation(model) {
  const now = Date.now();
  return { id: newId(), title: "", renamed: false, model, system: "", messages: [], createdAt: now, updatedAt: now };
}

/** The turns before `end` that the model should read again: user and assistant turns with text. */
export function history(conversation, end = conversation.messages.length) {
  return conversation.messages
    .slice(0, end)
    .filter((m) => m.content && (m.role === "user" || m.role === "assistant"))
    .map((m) => ({ role: m.role, content: m.content }));
}

export class ConversationStore {
  constructor() {
    this.conversations = [];
    this.currentId = null;
    this.reload();
  }

  /** Read what is saved (again, e.g. after another tab changed it). */
  reload() {
    this.conversations = [];
    this.currentId = null;
    try {
      const saved = JSON.parse(localStorage.getItem(CONVERSATIONS) || "null");
      if (!saved || !Array.isArray(saved.conversations)) return;
      this.conversations = saved.conversations.filter((c) => c && c.id && Array.isArray(c.messages));
      this.currentId = saved.currentId || null;
    } catch {
      return; // unreadable: start over rather than break the page
    }
    for (const conversation of this.conversations) {
      for (const message of conversation.messages) {
        // An answer that was streaming when the page closed is simply what arrived.
        if (message.streaming) {
          delete message.streaming;
          message.stopped = true;
        }
      }
    }
  }

  /** Save everything; false when the browser refused (storage full or turned off). */
  save() {
    try {
      const data = { conversations: this.conversations, currentId: this.currentId };
      localStorage.setItem(CONVERSATIONS, JSON.stringify(data));
      return true;
    } catch {
      return false;
    }
  }

  get current() {
    return this.conversations.find((c) => c.id === this.currentId) || null;
  }

  open(id) {
    this.currentId = id;
  }

  /** A new, empty conversation, opened and first in the list. */
  create(model) {
    const conversation = newConversation(model);
    this.conversations.unshift(conversation);
    this.currentId = conversation.id;
    return conversation;
  }

  /** The open conversation, or a new one when none is open. */
  ensure(model) {
    return this.current || this.create(model);
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.conversations[0]?.id ?? null;
  }

  /** The conversation in use moves to the top of the list. */
  touch(conversation) {
    conversation.updatedAt = Date.now();
    this.conversations = [conversation, ...this.conversations.filter((c) => c !== conversation)];
  }

  /** Conversations whose title or any message contains `query` (any case), in list order. */
  matching(query) {
    const needle = query.trim().toLocaleLowerCase();
    if (!needle) return this.conversations;
    const has = (text) => Boolean(text) && text.toLocaleLowerCase().includes(needle);
    return this.conversations.filter(
      (c) => has(titleOf(c)) || has(c.system) || c.messages.some((m) => has(m.content)),
    );
  }
}

export function getKey() {
  try {
    return localStorage.getItem(KEY) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
  } catch {
    // storage turned off: the key lives until the page closes
  }
}

/** Whether the reader dismissed the notice called `name` (it stays dismissed). */
export function isDismissed(name) {
  try {
    return localStorage.getItem(DISMISSED + name) === "1";
  } catch {
    return false;
  }
}

export function dismiss(name) {
  try {
    localStorage.setItem(DISMISSED + name, "1");
  } catch {
    // storage turned off: dismissed until the page closes
  }
}
