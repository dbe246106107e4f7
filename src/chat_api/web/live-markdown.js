// An answer's Markdown on screen while it is written: finished blocks are drawn once,
// only the block still being written is parsed and drawn again.
//
// Rendering the whole answer again for every new piece costs time in proportion to its
// length: at 80,000 characters, more than a frame's budget. A top-level block (paragraph,
// list, code block, table…) that another block follows can no longer change, so once the
// lexer sees a block after it, it is rendered one last time and kept. Each update parses
// only the text after the last kept block, the tail, which stays about one block long.
//
// Kept blocks go into sections of SECTION blocks (`<div class="blocks">`), which the
// stylesheet lets the browser skip (no layout, no paint) while they are out of view, so
// drawing a frame does not grow with the answer either.

import { lex, renderTokens } from "./markdown.js";

const SECTION = 16;

export class LiveMarkdown {
  constructor(element) {
    this.element = element;
    this.text = "";
    this.kept = 0; // characters of `text` already drawn as finished blocks
    this.section = null; // the section kept blocks go into
    this.tail = []; // the nodes the tail was drawn as
  }

  /** Show `text`, which usually extends the text shown before; returns the characters parsed. */
  show(text) {
    if (!text.startsWith(this.text.slice(0, this.kept))) this.clear();
    this.text = text;
    const rest = text.slice(this.kept);
    let tokens = lex(rest);
    let last = tokens.length - 1;
    while (last > 0 && tokens[last].type === "space") last -= 1;
    const finished = tokens.slice(0, Math.max(last, 0));
    const raw = finished.map((token) => token.raw).join("");
    for (const node of this.tail) node.remove();
    // The lexer's blocks cover its input exactly; should they not, keep nothing and stay correct.
    if (finished.length && rest.startsWith(raw)) {
      this.#keep(renderTokens(finished));
      this.kept += raw.length;
      tokens = tokens.slice(finished.length);
    }
    const fragment = renderTokens(tokens);
    this.tail = [...fragment.childNodes];
    this.element.append(fragment);
    return rest.length;
  }

  clear() {
    this.element.replaceChildren();
    this.text = "";
    this.kept = 0;
    this.section = null;
    this.tail = [];
  }

  #keep(fragment) {
    for (const node of [...fragment.childNodes]) {
      if (node.nodeType === Node.ELEMENT_NODE && !(this.section?.childElementCount < SECTION)) {
        this.section = document.createElement("div");
        this.section.className = "blocks";
        this.element.append(this.section);
      }
      (this.section ?? this.element).append(node);
    }
  }
}
