// Keeps the newest message in view: the thread follows its end while the reader is
// there, and stays put once they scroll up to read.

const NEAR_END = 80; // pixels from the end that still count as "at the end"

export class FollowEnd {
  constructor(scroller, content) {
    this.scroller = scroller;
    this.atEnd = true;
    scroller.addEventListener("scroll", () => {
      const { scrollTop, scrollHeight, clientHeight } = scroller;
      this.atEnd = scrollHeight - scrollTop - clientHeight < NEAR_END;
    });
    // Whatever changes the room (a banner shown after load, the message box growing, a
    // phone keyboard, an answer growing) keeps the end in view, so the last message never
    // sits under the message box.
    const observer = new ResizeObserver(() => this.follow());
    observer.observe(scroller);
    observer.observe(content);
  }

  follow() {
    if (this.atEnd) this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  /** Go to the end and follow it again. */
  toEnd() {
    this.atEnd = true;
    this.follow();
  }
}
