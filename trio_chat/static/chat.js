// The Harbourview guest chat page: protocol v1 over the browser's own WebSocket.
// Plain script, no build step. The connection logic (backoff, outbox, transcript,
// status) lives in `Chat`; `View` only draws.
(() => {
  "use strict";

  const TOKEN_KEY = "trio-chat.token";
  const OUTBOX_KEY = "trio-chat.outbox";
  // spreadMs: the first retry after losing a healthy connection is uniform in
  // [0, spreadMs]. A crash drops every guest at once; without it their first retries
  // would all fall within half a second (the Python client does the same).
  const BACKOFF = { initialMs: 500, factor: 2, maxMs: 30000, spreadMs: 5000 };
  const HINT_JITTER = { fraction: 0.2, maxMs: 500 };
  const CONNECT_TIMEOUT_MS = 10000;
  const HEALTHY_AFTER_MS = 10000;
  const MAX_TEXT = 4000;

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ drawing

  class View {
    constructor() {
      this.status = $("status");
      this.statusText = this.status.querySelector(".status-text");
      this.messages = $("messages");
      this.typing = $("typing");
      this.notice = $("notice");
      this.input = $("input");
      this.sendButton = $("send");
    }

    setStatus(state, words) {
      this.status.dataset.state = state;
      this.statusText.textContent = words;
    }

    showNotice(text, action) {
      this.notice.textContent = text;
      if (action) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = action.label;
        button.addEventListener("click", action.run);
        this.notice.append(button);
      }
      this.notice.hidden = false;
    }

    hideNotice() {
      this.notice.hidden = true;
      this.notice.textContent = "";
    }

    setTyping(text) {
      this.typing.textContent = text || "";
      this.typing.hidden = !text;
    }

    element(message) {
      const item = document.createElement("li");
      item.className = "msg";
      item.dataset.sender = message.sender;
      if (message.seq) item.dataset.seq = String(message.seq);
      if (message.client_msg_id) item.dataset.cmid = message.client_msg_id;
      const labels = { guest: "You", ai: "Concierge", staff: message.author || "Staff" };
      if (labels[message.sender]) {
        const who = document.createElement("span");
        who.className = "who";
        who.textContent = message.sender === "staff"
          ? `${labels.staff} · hotel team` : labels[message.sender];
        item.append(who);
      }
      const body = document.createElement("span");
      body.className = "body";
      body.textContent = message.text;
      item.append(body);
      const meta = document.createElement("span");
      meta.className = "meta";
      item.append(meta);
      this.fillMeta(item, message);
      return item;
    }

    fillMeta(item, message) {
      const meta = item.querySelector(".meta");
      if (!meta) return;
      if (!item.dataset.seq) {
        meta.textContent = item.dataset.failed ? `Not sent: ${item.dataset.failed}` : "Sending…";
        return;
      }
      const when = message.ts ? new Date(message.ts) : null;
      meta.textContent = when
        ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
    }

    // Stored messages in seq order; pending ones (no seq yet) stay at the end.
    place(item) {
      const seq = Number(item.dataset.seq || 0);
      if (seq) {
        for (const other of this.messages.children) {
          const otherSeq = Number(other.dataset.seq || 0);
          if (other !== item && (!otherSeq || otherSeq > seq)) {
            this.messages.insertBefore(item, other);
            return;
          }
        }
      }
      this.messages.append(item);
    }

    markRead(readSeq) {
      for (const item of this.messages.querySelectorAll('.msg[data-sender="guest"][data-seq]')) {
        const seen = Number(item.dataset.seq) <= readSeq;
        item.dataset.read = seen ? "true" : "false";
        const meta = item.querySelector(".meta");
        if (meta && seen && !meta.textContent.endsWith("· Seen")) {
          meta.textContent = `${meta.textContent} · Seen`;
        }
      }
    }

    scrollToEnd() {
      const log = this.messages.parentElement;
      log.scrollTop = log.scrollHeight;
    }
  }

  // ------------------------------------------------------------- connection

  class Chat {
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
      this.stopped = false; // after 4401: never retry with that token
      this.online = navigator.onLine !== false;
      this.heartbeatMs = 20000;
      this.lastReceived = 0;
      this.pingId = 0;
      this.held = 0; // highest seq with nothing missing below it
      this.stored = new Map(); // seq -> message
      this.historyPending = false;
      this.readSeq = 0;
      this.readSent = 0;
      this.status = "ai";
      this.assignedTo = null;
      this.wantsPerson = false; // "talk to a person" pressed while disconnected
      this.outbox = this.loadOutbox(); // [{client_msg_id, text, sentOn}]
      for (const item of this.outbox) this.drawPending(item);
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
      ws.onopen = () => this.send({ type: "hello", token: this.token });
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
      if (code === 4401) {
        this.stopped = true;
        this.setState("closed");
        this.view.showNotice("We could not verify this chat session.", {
          label: "Start a new chat",
          run: () => { localStorage.removeItem(TOKEN_KEY); localStorage.removeItem(OUTBOX_KEY); location.reload(); },
        });
        return;
      }
      if (code === 1000 && wasWelcomed) {
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
      const ceiling = Math.min(BACKOFF.maxMs,
        BACKOFF.initialMs * BACKOFF.factor ** Math.max(0, this.attempt - 1));
      const first = this.attempt <= 1;
      let delay = Math.random() * (first ? BACKOFF.spreadMs : ceiling); // full jitter
      const hint = this.hintMs;
      this.hintMs = null;
      if (hint !== null) {
        // The server already spread its hints; ours only breaks ties.
        const hinted = hint + Math.random() * Math.min(hint * HINT_JITTER.fraction,
          HINT_JITTER.maxMs);
        if (code === 1001 || code === 1012) delay = hinted;
        else if (code === 1013 || code === 4429) delay = Math.max(delay, hinted);
      }
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
      if (this.ws) this.abandon(this.connection, "offline", 1001);
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
      this.send({ type: "ping", id: this.pingId });
    }

    receive(connection, raw) {
      if (connection !== this.connection) return;
      this.lastReceived = Date.now();
      let frame;
      try {
        frame = JSON.parse(raw);
      } catch (_) {
        return; // not ours to understand
      }
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
      if (frame.last_seq > this.held) this.requestHistory();
      this.flush();
      if (this.wantsPerson && this.send({ type: "escalate" })) this.wantsPerson = false;
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
      if (this.send({ type: "history", after_seq: this.held, limit: 500 })) {
        this.historyPending = true;
      }
    }

    onHistory(frame) {
      this.historyPending = false;
      for (const message of frame.messages) this.onMessage(message, true);
      if (frame.has_more || this.held < frame.last_seq || this.parked()) this.requestHistory();
    }

    parked() {
      for (const seq of this.stored.keys()) if (seq > this.held) return true;
      return false;
    }

    onMessage(message, fromHistory = false) {
      if (this.stored.has(message.seq)) return; // a message we already hold
      this.stored.set(message.seq, message);
      while (this.stored.has(this.held + 1)) this.held += 1;
      this.draw(message);
      if (!fromHistory && message.seq > this.held) this.requestHistory(); // a gap
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
      this.outbox = this.outbox.filter((m) => m.client_msg_id !== frame.client_msg_id);
      this.saveOutbox();
      const item = this.view.messages.querySelector(`[data-cmid="${CSS.escape(frame.client_msg_id)}"]`);
      if (item && !item.dataset.seq) {
        item.dataset.seq = String(frame.seq);
        this.view.fillMeta(item, frame);
        this.view.place(item);
      }
    }

    onError(frame) {
      const pending = this.outbox.find((m) => m.client_msg_id === frame.ref);
      if (!pending) return;
      if (frame.code === "rate_limited" || frame.code === "internal") {
        pending.sentOn = null; // not refused: try again a little later
        setTimeout(() => this.flush(), Number(frame.retry_after_ms) || 1000);
        return;
      }
      // Refused for good: it leaves the outbox so it never blocks the others.
      this.outbox = this.outbox.filter((m) => m !== pending);
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
      if (this.held > this.readSent && this.send({ type: "read", seq: this.held })) {
        this.readSent = this.held;
      }
    }

    // -- what the guest does --

    submit(text) {
      const trimmed = text.trim();
      if (!trimmed) return false;
      if (trimmed.length > MAX_TEXT) {
        this.view.showNotice(`Messages can be at most ${MAX_TEXT} characters.`);
        return false;
      }
      const message = { client_msg_id: newId(), text: trimmed, sentOn: null };
      this.outbox.push(message);
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
      for (const message of this.outbox) {
        if (message.sentOn === this.connection) continue;
        if (!this.send({ type: "message", client_msg_id: message.client_msg_id, text: message.text })) return;
        message.sentOn = this.connection;
      }
    }

    askForPerson() {
      if (this.welcomed && this.send({ type: "escalate", reason: "pressed 'talk to a person'" })) return;
      this.wantsPerson = true; // sent after the next welcome
    }

    loadOutbox() {
      try {
        const saved = JSON.parse(localStorage.getItem(OUTBOX_KEY) || "[]");
        return Array.isArray(saved)
          ? saved.map((m) => ({ client_msg_id: m.client_msg_id, text: m.text, sentOn: null })) : [];
      } catch (_) {
        return [];
      }
    }

    saveOutbox() {
      localStorage.setItem(OUTBOX_KEY, JSON.stringify(
        this.outbox.map((m) => ({ client_msg_id: m.client_msg_id, text: m.text }))));
    }
  }

  function newId() {
    const random = (crypto.randomUUID && crypto.randomUUID())
      || `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    return `w-${random}`.slice(0, 64);
  }

  // ------------------------------------------------------------------ wiring

  const view = new View();
  const chat = new Chat(view);
  window.trioChat = chat; // for people debugging in the console, and for tests

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (chat.submit(view.input.value)) view.input.value = "";
    view.input.focus();
  });
  view.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  let typing = false;
  view.input.addEventListener("input", () => {
    const active = view.input.value.trim() !== "";
    if (active !== typing && chat.send({ type: "typing", active })) typing = active;
  });
  $("escalate").addEventListener("click", () => chat.askForPerson());
  window.addEventListener("offline", () => chat.goOffline());
  window.addEventListener("online", () => chat.goOnline());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      chat.checkAlive();
      chat.markRead();
    }
  });

  if (chat.online) chat.connect();
  else chat.setState("offline");
})();
