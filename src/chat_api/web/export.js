// Export a conversation as a file: Markdown to read or share, JSON to reuse
// (its `messages` can be sent back to /chat or to any OpenAI-style API).

import { titleOf } from "./store.js";

function said(conversation) {
  return conversation.messages.filter((m) => m.content && (m.role === "user" || m.role === "assistant"));
}

export function asMarkdown(conversation) {
  const lines = [`# ${titleOf(conversation)}`, "", `Exported from chat-api on ${new Date().toLocaleString()}.`, ""];
  if (conversation.system.trim()) lines.push(`> **Instructions:** ${conversation.system.trim()}`, "");
  for (const message of said(conversation)) {
    if (message.role === "user") {
      lines.push("## You", "", message.content, "");
    } else {
      lines.push(`## Assistant${message.model ? ` (${message.model})` : ""}`, "", message.content, "");
      if (message.stopped) lines.push("*(stopped before the end)*", "");
      else if (message.error) lines.push("*(incomplete: the answer broke off)*", "");
    }
  }
  return lines.join("\n");
}

export function asJSON(conversation) {
  const messages = said(conversation).map((m) => ({ role: m.role, content: m.content }));
  if (conversation.system.trim()) messages.unshift({ role: "system", content: conversation.system.trim() });
  const data = {
    title: titleOf(conversation),
    model: conversation.model,
    exported_at: new Date().toISOString(),
    messages,
  };
  return `${JSON.stringify(data, null, 2)}\n`;
}

const FORMATS = {
  markdown: { make: asMarkdown, type: "text/markdown", extension: "md" },
  json: { make: asJSON, type: "application/json", extension: "json" },
};

/** Save `conversation` as a file in `format` ("markdown" or "json") through the browser's downloads. */
export function download(conversation, format) {
  const { make, type, extension } = FORMATS[format];
  const name = titleOf(conversation)
    .toLowerCase()
    .replace(/[^\p{L}\p{N}]+/gu, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 60);
  const url = URL.createObjectURL(new Blob([make(conversation)], { type: `${type};charset=utf-8` }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name || "chat"}.${extension}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
