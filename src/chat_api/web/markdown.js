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

/** `text` as marked's top-level block tokens (each with its `raw` source text). */
export function lex(text) {
  return marked.lexer(text);
}

/** Sanitized, highlighted DOM for some of the tokens `lex` returned, ready to put in the page. */
export function renderTokens(tokens) {
  return safeFragment(marked.parser(tokens));
}

const SAMPLE = "# A\n\nSome **bold**, *italic*, `code` and a [link](https://example.com).\n\n- one\n- two\n\n" +
  "1. one\n\n> quote\n\n| a | b |\n| - | - |\n| 1 | 2 |\n\n---\n";

/**
 * Prepare the renderer while the page is idle: the first use of marked, DOMPurify and
 * each highlighting grammar costs tens of milliseconds (compiling), which the first
 * answer would otherwise pay in the middle of its stream. One piece per idle moment.
 */
export function warmUp() {
  const idle = window.requestIdleCallback || ((work) => setTimeout(work, 50));
  const steps = [() => renderTokens(lex(SAMPLE)), ...Object.keys(LANGUAGES).map((language) => () => hljs.highlight("x", { language }))];
  const next = () => {
    steps.shift()?.();
    if (steps.length) idle(next);
  };
  idle(next);
}

function safeFragment(html) {
  const fragment = DOMPurify.sanitize(html, PURIFY);
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
