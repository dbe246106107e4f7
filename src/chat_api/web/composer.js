// The composer: the message box and its Send / Stop button.

import { byId } from "./dom.js";

export class Composer {
  /** actions: {send(text), stop()} */
  constructor(actions) {
    this.form = byId("composer");
    this.input = byId("input");
    this.button = byId("send");
    this.busy = false;
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.busy) {
        actions.stop();
        return;
      }
      const text = this.input.value;
      if (!text.trim()) return;
      this.input.value = "";
      this.#update();
      actions.send(text);
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!this.busy) this.form.requestSubmit();
      }
    });
    this.input.addEventListener("input", () => this.#update());
    this.#update();
  }

  /** While an answer is written the button is Stop. */
  setBusy(busy) {
    this.busy = busy;
    this.#update();
  }

  focus() {
    this.input.focus();
  }

  #update() {
    const button = this.button;
    button.classList.toggle("stopping", this.busy);
    button.setAttribute("aria-label", this.busy ? "Stop" : "Send");
    button.title = this.busy ? "Stop (Esc)" : "Send (Enter)";
    button.disabled = !this.busy && !this.input.value.trim();
  }
}
