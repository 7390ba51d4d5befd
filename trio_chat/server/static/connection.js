// A protocol v1 connection over the browser's own WebSocket, shared by the guest page
// (guest.js) and the staff console (desk.js): the status words, backoff, the server's
// reconnect hints, the heartbeat watchdog, and stopping for good on 4401. A subclass
// says what its hello is and what it does with the frames (`handlers`, `onWelcome`).
import { retryDelay } from "./backoff.js";
import { CLOSE, frames, parseFrame } from "./protocol.js";

const CONNECT_TIMEOUT_MS = 10000;
const HEALTHY_AFTER_MS = 10000;

export class Connection {
  constructor(view, token) {
    this.view = view;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    this.url = `${scheme}//${location.host}/ws`;
    this.token = token;
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
    this.hintAt = 0; // when it arrived (Date.now())
    this.stopped = false; // after AUTH_FAILED (4401) or signing out: never retry
    this.authError = null; // the server's words with its auth_failed error
    this.online = navigator.onLine !== false;
    this.heartbeatMs = 20000;
    this.lastReceived = 0;
    this.pingId = 0;
  }

  // -- what a subclass provides --

  helloFrame() { return frames.hello(this.token); }
  get handlers() { return {}; } // frame type -> function(frame), called with this
  onWelcome(_frame) {} // after the common part of a welcome
  onDisconnected() {} // the socket is gone (whatever the reason)
  onAuthFailed(_why) {} // closed with 4401: this token will not work again

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
    ws.onopen = () => this.send(this.helloFrame());
    ws.onmessage = (event) => this.receive(connection, event.data);
    ws.onclose = (event) => this.closed(connection, event.code, event.reason);
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

  closed(connection, code, reason = "") {
    if (connection !== this.connection) return;
    clearTimeout(this.connectTimer);
    clearInterval(this.watchdog);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    this.onDisconnected();
    if (wasWelcomed && Date.now() - this.connectedAt >= HEALTHY_AFTER_MS) this.attempt = 0;
    if (code === CLOSE.AUTH_FAILED) {
      this.stopped = true;
      this.clearRetry();
      this.setState("closed");
      this.onAuthFailed(this.authError || reason || "authentication failed");
      return;
    }
    if (this.stopped || (code === CLOSE.NORMAL && wasWelcomed)) {
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
    const sinceHintMs = Date.now() - this.hintAt;
    const delay = retryDelay({ attempt: this.attempt, code, hintMs: this.hintMs, sinceHintMs });
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

  // Close for good (signing out): no retry, whatever the close code.
  stop() {
    this.stopped = true;
    this.clearRetry();
    if (this.ws) this.abandon(this.connection, "stopped", CLOSE.NORMAL);
    this.setState("closed");
  }

  goOffline() {
    this.online = false;
    this.clearRetry();
    // Browsers (and test drivers) may leave the socket open: close it ourselves.
    if (this.ws) this.abandon(this.connection, "offline", CLOSE.GOING_AWAY);
    if (!this.stopped) this.setState("offline");
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

  // A message the server did not refuse but postponed (rate_limited, internal): it
  // stays in the outbox and goes again after retry_after_ms. True if that is so.
  retryLater(pending, frame) {
    if (frame.code !== "rate_limited" && frame.code !== "internal") return false;
    pending.sentOn = null;
    setTimeout(() => this.flush(), Number(frame.retry_after_ms) || 1000);
    return true;
  }

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
    if (frame.type === "welcome") {
      this.welcome(frame);
      return;
    }
    if (frame.type === "reconnect") {
      this.hintMs = Math.max(0, Number(frame.after_ms) || 0);
      this.hintAt = Date.now();
      return;
    }
    if (frame.type === "error" && frame.code === "auth_failed") {
      this.authError = frame.message || null; // the close (4401) follows
      return;
    }
    const handler = this.handlers[frame.type];
    if (handler) handler.call(this, frame);
  }

  welcome(frame) {
    clearTimeout(this.connectTimer);
    this.welcomed = true;
    this.welcomedOnce = true;
    this.connectedAt = Date.now();
    this.heartbeatMs = Math.max(1000, (Number(frame.heartbeat_s) || 20) * 1000);
    this.setState("connected");
    this.onWelcome(frame);
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
}
