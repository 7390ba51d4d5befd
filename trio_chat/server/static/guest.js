// The guest's session: protocol v1 over the shared Connection, with an offline outbox
// and exact resume. It keeps the state; the view draws it.
import { Connection } from "./connection.js";
import { checkText, frames, newClientMsgId } from "./protocol.js";
import { Outbox, Transcript } from "./transcript.js";

export const TOKEN_KEY = "trio-chat.token";
export const OUTBOX_KEY = "trio-chat.outbox";

export class Chat extends Connection {
  // who: {name, room} the guest gave (or the hotel's link did); sent only when the
  // server creates the guest, with the first hello.
  constructor(view, who = {}) {
    super(view, localStorage.getItem(TOKEN_KEY));
    this.who = who;
    this.transcript = new Transcript();
    this.historyPending = false;
    this.readSeq = 0;
    this.readSent = 0;
    this.status = "ai";
    this.assignedTo = null;
    this.wantsPerson = false; // "talk to a person" pressed while disconnected
    this.outbox = Outbox.parse(localStorage.getItem(OUTBOX_KEY));
    for (const item of this.outbox.items) this.drawPending(item);
  }

  helloFrame() {
    return this.token ? frames.hello(this.token) : frames.hello(null, this.who);
  }

  onDisconnected() {
    this.view.setTyping("");
  }

  onAuthFailed() {
    this.view.showNotice("We could not verify this chat session.", {
      label: "Start a new chat",
      run: () => { localStorage.removeItem(TOKEN_KEY); localStorage.removeItem(OUTBOX_KEY); location.reload(); },
    });
  }

  get handlers() {
    return {
      message: (f) => this.onMessage(f),
      history: this.onHistory,
      ack: this.onAck,
      error: this.onError,
      status: this.onStatus,
      typing: this.onTyping,
      draft: (f) => { if (typeof f.text === "string") this.view.setDraft(f.text); },
      read: this.onRead,
    };
  }

  onWelcome(frame) {
    this.token = frame.token;
    localStorage.setItem(TOKEN_KEY, frame.token);
    this.readSeq = Math.max(this.readSeq, Number(frame.read_seq) || 0);
    this.status = frame.status;
    this.view.hideNotice();
    this.historyPending = false;
    if (frame.last_seq > this.transcript.held) this.requestHistory();
    this.flush();
    if (this.wantsPerson && this.send(frames.escalate())) this.wantsPerson = false;
  }

  requestHistory() {
    if (this.historyPending) return;
    if (this.send(frames.history(this.transcript.held))) {
      this.historyPending = true;
    }
  }

  onHistory(frame) {
    this.historyPending = false;
    for (const message of frame.messages) this.onMessage(message, true);
    const transcript = this.transcript;
    if (frame.has_more || transcript.held < frame.last_seq || transcript.gap) this.requestHistory();
  }

  onMessage(message, fromHistory = false) {
    // The stored answer replaces the concierge's draft of it.
    if (message.sender === "ai") this.view.clearDraft();
    if (!this.transcript.add(message)) return; // a message we already hold
    this.draw(message);
    if (!fromHistory && message.seq > this.transcript.held) this.requestHistory(); // a gap
    if (message.sender !== "guest" && document.visibilityState === "visible") {
      this.markRead();
    }
    if (message.sender !== "guest") this.view.setTyping("");
  }

  draw(message) {
    let item = null;
    if (message.client_msg_id && message.sender === "guest") {
      item = this.view.messages.querySelector(`[data-cmid="${CSS.escape(message.client_msg_id)}"]`);
    }
    if (item) {
      item.dataset.seq = String(message.seq);
      delete item.dataset.failed;
      this.view.fillMeta(item, message);
    } else {
      item = this.view.element(message);
    }
    this.view.place(item);
    this.view.markRead(this.readSeq);
    this.view.scrollToEnd();
  }

  onAck(frame) {
    this.outbox.remove(frame.client_msg_id);
    this.saveOutbox();
    const item = this.view.messages.querySelector(`[data-cmid="${CSS.escape(frame.client_msg_id)}"]`);
    if (item && !item.dataset.seq) {
      item.dataset.seq = String(frame.seq);
      this.view.fillMeta(item, frame);
      this.view.place(item);
    }
  }

  onError(frame) {
    const pending = this.outbox.find(frame.ref);
    if (!pending) return;
    if (frame.code === "rate_limited" || frame.code === "internal") {
      pending.sentOn = null; // not refused: try again a little later
      setTimeout(() => this.flush(), Number(frame.retry_after_ms) || 1000);
      return;
    }
    // Refused for good: it leaves the outbox so it never blocks the others.
    this.outbox.remove(pending.client_msg_id);
    this.saveOutbox();
    const item = this.view.messages.querySelector(`[data-cmid="${CSS.escape(pending.client_msg_id)}"]`);
    if (item) {
      item.dataset.failed = frame.message || frame.code;
      this.view.fillMeta(item, {});
    }
  }

  onStatus(frame) {
    this.status = frame.status;
    this.assignedTo = frame.assigned_to;
  }

  onTyping(frame) {
    if (!frame.active) {
      this.view.setTyping("");
      if (frame.sender === "ai") this.view.clearDraft();
    } else if (frame.sender === "ai") {
      this.view.setTyping("The concierge is typing…");
    } else if (frame.sender === "staff") {
      this.view.setTyping(`${this.assignedTo || "Our team"} is typing…`);
    }
  }

  onRead(frame) {
    if (frame.reader !== "staff") return;
    this.readSeq = Math.max(this.readSeq, Number(frame.seq) || 0);
    this.view.markRead(this.readSeq);
  }

  markRead() {
    const held = this.transcript.held;
    if (held > this.readSent && this.send(frames.read(held))) {
      this.readSent = held;
    }
  }

  // -- what the guest does --

  submit(text) {
    const checked = checkText(text);
    if (checked.error) {
      if (checked.error !== "empty") this.view.showNotice(checked.error);
      return false;
    }
    const message = this.outbox.add(newClientMsgId(), checked.text);
    this.saveOutbox();
    this.drawPending(message);
    this.flush();
    return true;
  }

  drawPending(message) {
    const item = this.view.element({ sender: "guest", text: message.text,
      client_msg_id: message.client_msg_id });
    this.view.place(item);
    this.view.scrollToEnd();
  }

  // Send what waits, once per connection, in order, with its original id.
  flush() {
    if (!this.welcomed) return;
    for (const message of this.outbox.due(this.connection)) {
      if (!this.send(frames.message(message.client_msg_id, message.text))) return;
      message.sentOn = this.connection;
    }
  }

  // The guest said who they are after the page had already made them a guest. While
  // nothing is written yet, start over as a new guest who carries the name and room
  // (a hello with a token cannot change them); later it is too late, and ignored.
  introduce(who) {
    this.who = who;
    if (this.token && (this.transcript.held > 0 || this.outbox.items.length > 0)) return;
    if (!String(who.name || "").trim() && !String(who.room || "").trim()) return;
    localStorage.removeItem(TOKEN_KEY);
    this.token = null;
    if (this.ws) this.abandon(this.connection, "introduced", 1000);
    this.stopped = false;
    this.attempt = 0;
    this.connect();
  }

  askForPerson() {
    if (this.welcomed && this.send(frames.escalate("pressed 'talk to a person'"))) return;
    this.wantsPerson = true; // sent after the next welcome
  }

  saveOutbox() {
    localStorage.setItem(OUTBOX_KEY, this.outbox.serialize());
  }
}
