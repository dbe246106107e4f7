// What the page keeps in this browser (localStorage): conversations and the access key.

const CONVERSATIONS = "chat-api.conversations.v1";
const KEY = "chat-api.key";

export function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** A fresh, empty conversation. */
export function newConversation(model = null) {
  const now = Date.now();
  return { id: newId(), title: "", renamed: false, model, system: "", messages: [], createdAt: now, updatedAt: now };
}

/** `{conversations, currentId}`, newest first; an empty state if nothing (valid) was saved. */
export function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(CONVERSATIONS) || "null");
    if (saved && Array.isArray(saved.conversations)) {
      const conversations = saved.conversations.filter((c) => c && c.id && Array.isArray(c.messages));
      for (const conversation of conversations) {
        for (const message of conversation.messages) {
          // An answer that was streaming when the page closed is simply what arrived.
          if (message.streaming) {
            delete message.streaming;
            message.stopped = true;
          }
        }
      }
      return { conversations, currentId: saved.currentId || null };
    }
  } catch {
    // unreadable: start over rather than break the page
  }
  return { conversations: [], currentId: null };
}

/** Save everything; false when the browser refused (storage full or disabled). */
export function save(state) {
  try {
    localStorage.setItem(
      CONVERSATIONS,
      JSON.stringify({ conversations: state.conversations, currentId: state.currentId }),
    );
    return true;
  } catch {
    return false;
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
    // storage disabled: the key lives until the page closes
  }
}
