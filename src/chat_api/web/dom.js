// Small DOM helpers every part of the page uses.

export const byId = (id) => document.getElementById(id);

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A plain `<button type="button">`; `label` is its accessible name when it differs from its text. */
export function button(className, text, label) {
  const node = el("button", className, text);
  node.type = "button";
  if (label) node.setAttribute("aria-label", label);
  return node;
}

const ICONS = {
  rename: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16z"/></svg>',
  delete: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 7h14M10 7V4h4v3M7 7l1 13h8l1-13"/></svg>',
};

export function iconButton(icon, label) {
  const node = button("icon-button small", undefined, label);
  node.title = label;
  node.innerHTML = ICONS[icon]; // our own constant markup
  return node;
}

/** Tell screen readers `text` through the page's status region. */
export function announce(text) {
  const status = byId("status");
  status.textContent = "";
  // A fresh text node each time, so screen readers repeat an identical message.
  requestAnimationFrame(() => {
    status.textContent = text;
  });
}

/** Show `text` on a button for a moment (and announce it), then its own label again. */
export function flash(node, text) {
  const before = node.textContent;
  node.textContent = text;
  node.classList.add("flashed");
  announce(text);
  setTimeout(() => {
    node.textContent = before;
    node.classList.remove("flashed");
  }, 1500);
}

// Made once, as the page loads: the first number formatted in the reader's locale costs
// tens of milliseconds (locale data), which an answer would otherwise pay as it ends.
const NUMBER = new Intl.NumberFormat();

export const formatNumber = (n) => NUMBER.format(n);

export function plural(n, word) {
  return `${formatNumber(n)} ${word}${n === 1 ? "" : "s"}`;
}

export function formatMoney(value) {
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (number > 0 && number < 0.01) return "under $0.01";
  return `$${number.toFixed(2)}`;
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
