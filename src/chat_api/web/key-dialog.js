// The access key: asked for on load when the server uses keys, and checked with the
// server before it is kept, so a wrong key is explained at once and never saved.

import * as api from "./api.js";
import { announce, byId } from "./dom.js";
import * as store from "./store.js";

const NO_LONGER =
  "The key saved in this browser is no longer accepted (it may have expired or been revoked). Paste a new one.";

export class KeyDialog {
  /** changed(usage | null): a key was saved (with what it spent) or forgotten. */
  constructor(changed) {
    this.changed = changed;
    this.key = store.getKey();
    this.enabled = false; // the server uses keys
    this.then = null; // what to do once a key is saved (send the message that needed it)
    this.ui = {
      dialog: byId("key-dialog"),
      form: byId("key-form"),
      text: byId("key-text"),
      error: byId("key-error"),
      input: byId("key-input"),
      forget: byId("key-forget"),
      cancel: byId("key-cancel"),
      save: byId("key-save"),
      button: byId("key-button"),
      label: byId("key-button-label"),
    };
    const ui = this.ui;
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.#save();
    });
    ui.cancel.addEventListener("click", () => ui.dialog.close());
    ui.dialog.addEventListener("close", () => {
      this.then = null;
    });
    ui.forget.addEventListener("click", () => {
      this.#forget();
      ui.dialog.close();
      announce("Access key removed from this browser.");
    });
    ui.button.addEventListener("click", () => this.ask());
  }

  /** The server uses keys: show the key control, and ask for a key now unless the saved one works. */
  async start() {
    this.enabled = true;
    this.ui.button.hidden = false;
    this.#label();
    if (!this.key) {
      this.ask();
      return;
    }
    try {
      this.changed(await api.usage(this.key));
    } catch (error) {
      if (error.kind !== "auth") return; // the server is busy or away: keep the key, try later
      this.#forget();
      this.ask({ problem: NO_LONGER });
    }
  }

  ask({ problem = "", then = null } = {}) {
    const ui = this.ui;
    this.then = then;
    ui.text.textContent = this.key
      ? "A key is saved in this browser. Paste a new one to replace it."
      : "This server asks for an access key before it answers. Paste the key you were given.";
    this.#problem(problem);
    ui.input.value = "";
    ui.forget.hidden = !this.key;
    ui.save.textContent = then ? "Save and send" : "Save";
    if (!ui.dialog.open) ui.dialog.showModal();
    ui.input.focus();
  }

  /** The server refused the saved key mid-chat: forget it, ask for another, then do `then`. */
  rejected(then) {
    const problem = this.key ? api.KEY_REJECTED : "";
    this.#forget();
    this.ask({ problem, then });
  }

  async #save() {
    const ui = this.ui;
    const key = ui.input.value.trim();
    if (!key) {
      this.#problem("Paste a key first.");
      ui.input.focus();
      return;
    }
    ui.save.disabled = true;
    const label = ui.save.textContent;
    ui.save.textContent = "Checking…";
    let usage;
    try {
      usage = await api.usage(key);
    } catch (error) {
      this.#problem(error.message);
      ui.input.select();
      return;
    } finally {
      ui.save.disabled = false;
      ui.save.textContent = label;
    }
    this.key = key;
    store.setKey(key);
    this.#label();
    const then = this.then;
    ui.dialog.close();
    announce("Access key saved.");
    this.changed(usage);
    if (then) then();
    else byId("input").focus();
  }

  #forget() {
    this.key = "";
    store.setKey("");
    this.#label();
    this.changed(null);
  }

  #problem(text) {
    this.ui.error.textContent = text;
    this.ui.error.hidden = !text;
  }

  #label() {
    this.ui.label.textContent = this.key ? "Access key saved" : "Access key";
  }
}
