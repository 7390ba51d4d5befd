// The guest's connection: protocol v1 over the browser's own WebSocket, with backoff,
// an offline outbox and exact resume. It keeps the state; the view draws it.
import { retryDelay } from "./backoff.js";
import { CLOSE, checkText, frames, newClientMsgId, parseFrame } from "./protocol.js";
import { Outbox, Transcript } from "./transcript.js";

export const TOKEN_KEY = "trio-chat.token";
export const OUTBOX_KEY = "trio-chat.outbox";
const CONNECT_TIMEOUT_MS = 10000;
const HEALTHY_AFTER_MS = 10000;

export class Chat {
  constructor(view) {
    this.view = view;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.url = `${scheme}//${location.host}/ws`;
    this.token = localStorage.getItem(TOKEN_KEY);
    this.ws = null;
    this.connection = 0; // number of the current socket
    this.welcomed = false; // the current socket got its welcome
    this.welcomedOnce = false;
    this.attempt = 0; // attempts since the last healthy connection
    this.connectedAt = 0;
    this.retryTimer = null;
    this.retryAt = 0;
    this.countdown = null;
    this.connectTimer = null;
    this.watchdog = null;
    this.hintMs = null; // the server's reconnect.after_ms / retry_after_ms
    this.stopped = false; // after AUTH_FAILED (4401): never retry with that token
    this.online = navigator.onLine !== false;
    this.heartbeatMs = 20000;
    this.lastReceived = 0;
    this.pingId = 0;
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

  // -- state and status words --

  setState(state) {
    this.state = state;
    this.renderStatus();
  }

  renderStatus() {
    const words = {
      connecting: "Connecting…",
      connected: "Connected",
      offline: "Offline: waiting for the network",
      closed: "Chat closed",
    };
    let text = words[this.state] || "Reconnecting";
    if (this.state === "reconnecting" || (this.state === "connecting" && this.attempt > 1)) {
      text = `${this.state === "connecting" ? "Connecting" : "Reconnecting"}` +
        ` (attempt ${this.attempt})`;
      if (this.retryTimer) {
        const seconds = Math.max(0, (this.retryAt - Date.now()) / 1000);
        text += `, next try in ${seconds.toFixed(0)} s`;
      }
    }
    this.view.setStatus(this.state, text);
  }

  // -- connecting --

  connect() {
    if (this.stopped || !this.online) return;
    this.clearRetry();
    if (this.ws) return;
    this.attempt += 1;
    this.connection += 1;
    this.welcomed = false;
    this.setState(this.welcomedOnce ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    const connection = this.connection;
    this.ws = ws;
    // The whole attempt, open to welcome, has one deadline.
    this.connectTimer = setTimeout(() => this.abandon(connection, "connect timed out"),
      CONNECT_TIMEOUT_MS);
    ws.onopen = () => this.send(frames.hello(this.token));
    ws.onmessage = (event) => this.receive(connection, event.data);
    ws.onclose = (event) => this.closed(connection, event.code);
  }

  // Forget a socket at once (dead link, timeout, offline) without waiting for the
  // browser to finish closing it: it may never tell us.
  abandon(connection, why, code = 1006) {
    if (connection !== this.connection || !this.ws) return;
    const ws = this.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try { ws.close(); } catch (_) { /* already closing */ }
    this.closed(connection, code, why);
  }

  closed(connection, code) {
    if (connection !== this.connection) return;
    clearTimeout(this.connectTimer);
    clearInterval(this.watchdog);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    this.view.setTyping("");
    if (wasWelcomed && Date.now() - this.connectedAt >= HEALTHY_AFTER_MS) this.attempt = 0;
    if (code === CLOSE.AUTH_FAILED) {
      this.stopped = true;
      this.setState("closed");
      this.view.showNotice("We could not verify this chat session.", {
        label: "Start a new chat",
        run: () => { localStorage.removeItem(TOKEN_KEY); localStorage.removeItem(OUTBOX_KEY); location.reload(); },
      });
      return;
    }
    if (code === CLOSE.NORMAL && wasWelcomed) {
      this.setState("closed");
      return;
    }
    if (!this.online) {
      this.setState("offline");
      return;
    }
    this.scheduleRetry(code);
  }

  scheduleRetry(code) {
    const delay = retryDelay({ attempt: this.attempt, code, hintMs: this.hintMs });
    this.hintMs = null;
    this.retryDelay = delay;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => { this.retryTimer = null; this.connect(); }, delay);
    this.countdown = setInterval(() => this.renderStatus(), 250);
    this.setState(this.welcomedOnce ? "reconnecting" : "connecting");
  }

  clearRetry() {
    clearTimeout(this.retryTimer);
    clearInterval(this.countdown);
    this.retryTimer = null;
  }

  reconnectNow() {
    if (this.stopped || !this.online) return;
    if (!this.ws) this.connect();
  }

  goOffline() {
    this.online = false;
    this.clearRetry();
    // Browsers (and test drivers) may leave the socket open: close it ourselves.
    if (this.ws) this.abandon(this.connection, "offline", CLOSE.GOING_AWAY);
    this.setState("offline");
  }

  goOnline() {
    this.online = true;
    this.reconnectNow();
  }

  checkAlive() {
    if (!this.ws) {
      this.reconnectNow();
    } else if (this.welcomed && Date.now() - this.lastReceived > this.heartbeatMs) {
      this.ping();
    }
  }

  // -- frames --

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  ping() {
    this.pingId += 1;
    this.send(frames.ping(this.pingId));
  }

  receive(connection, raw) {
    if (connection !== this.connection) return;
    this.lastReceived = Date.now();
    const frame = parseFrame(raw);
    if (frame === null) return; // not ours to understand
    const handler = this.handlers[frame.type];
    if (handler) handler.call(this, frame);
  }

  get handlers() {
    return {
      welcome: this.onWelcome,
      message: (f) => this.onMessage(f),
      history: this.onHistory,
      ack: this.onAck,
      error: this.onError,
      status: this.onStatus,
      typing: this.onTyping,
      draft: (f) => { if (typeof f.text === "string") this.view.setDraft(f.text); },
      read: this.onRead,
      reconnect: (f) => { this.hintMs = Math.max(0, Number(f.after_ms) || 0); },
    };
  }

  onWelcome(frame) {
    clearTimeout(this.connectTimer);
    this.token = frame.token;
    localStorage.setItem(TOKEN_KEY, frame.token);
    this.welcomed = true;
    this.welcomedOnce = true;
    this.connectedAt = Date.now();
    this.heartbeatMs = Math.max(1000, (Number(frame.heartbeat_s) || 20) * 1000);
    this.readSeq = Math.max(this.readSeq, Number(frame.read_seq) || 0);
    this.status = frame.status;
    this.view.hideNotice();
    this.setState("connected");
    this.historyPending = false;
    if (frame.last_seq > this.transcript.held) this.requestHistory();
    this.flush();
    if (this.wantsPerson && this.send(frames.escalate())) this.wantsPerson = false;
    this.startWatchdog();
  }

  startWatchdog() {
    clearInterval(this.watchdog);
    const connection = this.connection;
    // A link that went silent is noticed within two heartbeats.
    this.watchdog = setInterval(() => {
      const silent = Date.now() - this.lastReceived;
      if (silent > 1.5 * this.heartbeatMs) this.abandon(connection, "no answer");
      else if (silent > this.heartbeatMs / 2) this.ping();
    }, this.heartbeatMs / 4);
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

  askForPerson() {
    if (this.welcomed && this.send(frames.escalate("pressed 'talk to a person'"))) return;
    this.wantsPerson = true; // sent after the next welcome
  }

  saveOutbox() {
    localStorage.setItem(OUTBOX_KEY, this.outbox.serialize());
  }
}
