// The sidebar: saved conversations, search, rename and delete; a drawer on phones.

import { announce, byId, el, iconButton } from "./dom.js";
import { titleOf } from "./store.js";

export class Sidebar {
  /** actions: {open(id), remove(id), renamed(conversation)} */
  constructor(store, actions) {
    this.store = store;
    this.actions = actions;
    this.ui = {
      app: byId("app"),
      backdrop: byId("backdrop"),
      menu: byId("menu-button"),
      close: byId("close-sidebar"),
      first: byId("new-chat"),
      search: byId("search"),
      list: byId("conversation-list"),
      empty: byId("list-empty"),
      noMatch: byId("no-match"),
      confirm: byId("confirm-dialog"),
      confirmForm: byId("confirm-form"),
      confirmText: byId("confirm-text"),
      confirmCancel: byId("confirm-cancel"),
    };
    const ui = this.ui;
    ui.search.addEventListener("input", () => this.render());
    ui.menu.addEventListener("click", () => this.show());
    ui.close.addEventListener("click", () => {
      this.hide();
      ui.menu.focus();
    });
    ui.backdrop.addEventListener("click", () => this.hide());
    ui.confirmCancel.addEventListener("click", () => ui.confirm.close());
  }

  get isOpen() {
    return this.ui.app.classList.contains("sidebar-open");
  }

  /** Draw the list: the conversations that match the search, or a word about why there are none. */
  render() {
    const ui = this.ui;
    const query = ui.search.value;
    const any = this.store.conversations.length > 0;
    const shown = this.store.matching(query);
    ui.search.closest(".search").hidden = !any;
    ui.empty.hidden = any;
    ui.noMatch.hidden = !any || shown.length > 0;
    ui.noMatch.textContent = `No conversation mentions “${query.trim()}”.`;
    ui.list.replaceChildren(...shown.map((conversation) => this.#item(conversation)));
  }

  show() {
    const ui = this.ui;
    ui.app.classList.add("sidebar-open");
    ui.backdrop.hidden = false;
    ui.menu.setAttribute("aria-expanded", "true");
    ui.first.focus();
  }

  hide() {
    const ui = this.ui;
    if (!this.isOpen) return;
    ui.app.classList.remove("sidebar-open");
    ui.backdrop.hidden = true;
    ui.menu.setAttribute("aria-expanded", "false");
  }

  #item(conversation) {
    const item = el("li", "conversation");
    item.dataset.id = conversation.id;
    const open = el("button", "open-conversation", titleOf(conversation));
    open.type = "button";
    if (conversation.id === this.store.currentId) {
      item.classList.add("current");
      open.setAttribute("aria-current", "page");
    }
    open.addEventListener("click", () => {
      this.actions.open(conversation.id);
      this.hide();
      byId("input").focus();
    });
    const rename = iconButton("rename", `Rename “${titleOf(conversation)}”`);
    rename.addEventListener("click", () => this.#rename(item, conversation));
    const remove = iconButton("delete", `Delete “${titleOf(conversation)}”`);
    remove.addEventListener("click", () => this.#confirmDelete(conversation));
    item.append(open, rename, remove);
    return item;
  }

  #rename(item, conversation) {
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
        this.actions.renamed(conversation);
        announce(`Renamed to ${name}.`);
      }
      this.render();
      this.ui.list.querySelector(`[data-id="${CSS.escape(conversation.id)}"] .open-conversation`)?.focus();
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

  #confirmDelete(conversation) {
    const ui = this.ui;
    ui.confirmText.textContent = `“${titleOf(conversation)}” will be removed from this browser. This cannot be undone.`;
    ui.confirmForm.onsubmit = (event) => {
      event.preventDefault();
      ui.confirm.close();
      this.actions.remove(conversation.id);
    };
    ui.confirm.showModal();
  }
}
