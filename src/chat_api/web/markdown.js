// Model output → safe HTML: Markdown (marked), then sanitized (DOMPurify), then code highlighted.
//
// Three layers keep model output from ever running script: raw HTML in the Markdown is
// shown as text, DOMPurify removes anything active that is left, and the page's CSP
// forbids inline script anyway.

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.js";
import hljs from "./vendor/highlight/core.min.js";
import bash from "./vendor/highlight/languages/bash.min.js";
import c from "./vendor/highlight/languages/c.min.js";
import cpp from "./vendor/highlight/languages/cpp.min.js";
import css from "./vendor/highlight/languages/css.min.js";
import diff from "./vendor/highlight/languages/diff.min.js";
import go from "./vendor/highlight/languages/go.min.js";
import java from "./vendor/highlight/languages/java.min.js";
import javascript from "./vendor/highlight/languages/javascript.min.js";
import json from "./vendor/highlight/languages/json.min.js";
import markdown from "./vendor/highlight/languages/markdown.min.js";
import plaintext from "./vendor/highlight/languages/plaintext.min.js";
import python from "./vendor/highlight/languages/python.min.js";
import rust from "./vendor/highlight/languages/rust.min.js";
import shell from "./vendor/highlight/languages/shell.min.js";
import sql from "./vendor/highlight/languages/sql.min.js";
import typescript from "./vendor/highlight/languages/typescript.min.js";
import xml from "./vendor/highlight/languages/xml.min.js";
import yaml from "./vendor/highlight/languages/yaml.min.js";

const LANGUAGES = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell, sql,
  typescript, xml, yaml,
};
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML from the model is shown as the text it is, never interpreted.
    html({ text }) {
      return escapeHtml(text);
    },
    // Images would load from anywhere (and could leak the conversation in their URL):
    // show a plain link instead.
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(text || "image")}</a>`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style", "id", "name"],
  RETURN_DOM_FRAGMENT: true,
};

/** Sanitized, highlighted DOM for `text`, ready to put in the page. */
export function render(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const code of fragment.querySelectorAll("pre > code")) decorate(code);
  for (const table of fragment.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return fragment;
}

function decorate(code) {
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const label = match ? match[1].toLowerCase() : "";
  const source = code.textContent;
  const language = label && hljs.getLanguage(label) ? label : "";
  if (language) {
    // hljs escapes the source itself and only adds <span class="hljs-…">.
    code.innerHTML = hljs.highlight(source, { language, ignoreIllegals: true }).value;
  }
  code.className = language ? `hljs language-${language}` : "hljs";

  const pre = code.parentElement;
  const block = document.createElement("div");
  block.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const name = document.createElement("span");
  name.textContent = label || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${label || "code"}`);
  head.append(name, copy);
  pre.replaceWith(block);
  block.append(head, pre);
}

/** Put `text` on the clipboard; works on plain http too, where the Clipboard API is missing. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the old way
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}
