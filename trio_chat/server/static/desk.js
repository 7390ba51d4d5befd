// The staff console's session: protocol v1 as a staff member, over the same Connection
// as the guest page (status, backoff, resume). It keeps the inbox, the open
// conversations and the outbox; the view (staff-view.js) draws them.
import { Connection } from "./connection.js";
import { describeError, Inbox } from "./inbox.js";
import { checkText, frames, newClientMsgId, staffFrames } from "./protocol.js";
import { Thread } from "./thread.js";
import { Outbox } from "./transcript.js";

export const STAFF_TOKEN_KEY = "trio-chat.staff-token";
export const STAFF_OUTBOX_KEY = "trio-chat.staff-outbox";
const TYPING_IDLE_MS = 5000;
const ACTIONS = new Set(["claim", "release", "resolve", "watch", "unwatch"]);

export class Desk extends Connection {
  constructor(view, token) {
    super(view, token);
    this.me = null; // this staff member's name, from welcome
    this.inbox = new Inbox();
    this.threads = new Map(); // conversation_id -> Thread
    this.subscribed = new Set(); // on this connection
    this.watching = new Set(); // kept subscribed when not open (the Watch button)
    this.openId = null;
    this.onDuty = [];
    this.historyPending = new Set();
    this.pendingActions = []; // [{action, conversationId}], oldest first
    this.guestTyping = new Map(); // conversation_id -> true while the guest types
    this.readSent = new Map();
    this.typingOn = null; // the conversation our typing=true went to
    this.typingTimer = null;
    this.outbox = Outbox.parse(localStorage.getItem(STAFF_OUTBOX_KEY));
    this.failed = new Map(); // client_msg_id -> why, for messages refused for good
  }

  helloFrame() { return frames.hello(this.token); }

  get handlers() {
    return {
      queue: this.onQueue,
      conversation: this.onConversation,
      staff_presence: (f) => {
        this.onDuty = Array.isArray(f.staff) ? f.staff.map(String) : [];
        this.view.renderPresence();
      },
      subscribed: this.onSubscribed,
      message: (f) => this.onMessage(f),
      history: this.onHistory,
      ack: this.onAck,
      error: this.onError,
      status: this.onStatus,
      typing: this.onTyping,
      read: this.onRead,
    };
  }

  onWelcome(frame) {
    this.me = frame.name;
    this.token = frame.token || this.token;
    localStorage.setItem(STAFF_TOKEN_KEY, this.token);
    this.subscribed.clear();
    this.historyPending.clear();
    this.pendingActions = [];
    this.readSent.clear();
    this.typingOn = null;
    this.view.signedIn(this.me);
    // The server re-subscribes us to what we hold; watches we renew ourselves.
    const again = new Set(this.watching);
    if (this.openId) again.add(this.openId);
    for (const id of again) {
      if (!this.holds(id)) this.act("watch", id);
    }
    this.flush();
  }

  onDisconnected() {
    this.guestTyping.clear();
    this.view.renderTyping();
  }

  onAuthFailed(why) {
    localStorage.removeItem(STAFF_TOKEN_KEY);
    this.view.signedOut(`Signed out: ${why}.`);
  }

  // -- the inbox --

  onQueue(frame) {
    const fresh = this.inbox.replace(Array.isArray(frame.conversations) ? frame.conversations : []);
    this.view.renderInbox();
    for (const id of fresh) this.view.alert(this.inbox.get(id));
  }

  onConversation(entry) {
    const started = this.inbox.update(entry);
    this.view.renderInbox();
    if (entry.conversation_id === this.openId) this.view.renderHeader();
    if (started) this.view.alert(entry);
  }

  onStatus(frame) {
    const entry = this.inbox.get(frame.conversation_id);
    if (entry) {
      this.inbox.update({ ...entry, status: frame.status, assigned_to: frame.assigned_to });
      this.view.renderInbox();
    }
    // Someone else's claim settles nothing of ours: our own claim's conflict is still
    // on its way, and must find the conversation it was about.
    if (frame.status !== "staff") this.settle(frame.conversation_id, ["release", "resolve"]);
    else if (frame.assigned_to === this.me) this.settle(frame.conversation_id, ["claim"]);
    if (frame.conversation_id === this.openId) this.view.renderHeader();
  }

  holds(id) {
    const entry = this.inbox.get(id);
    return Boolean(entry && entry.status === "staff" && entry.assigned_to === this.me);
  }

  // -- conversations --

  thread(id) {
    let thread = this.threads.get(id);
    if (!thread) {
      thread = new Thread(id);
      this.threads.set(id, thread);
    }
    return thread;
  }

  open(id) {
    if (this.openId && this.openId !== id) this.leave(this.openId);
    this.openId = id;
    this.thread(id);
    this.view.hideNotice();
    if (!this.subscribed.has(id)) this.act("watch", id);
    else this.fill(id);
    this.view.renderConversation();
    this.view.renderInbox();
    this.markRead();
  }

  close() {
    if (this.openId) this.leave(this.openId);
    this.openId = null;
    this.view.renderConversation();
    this.view.renderInbox();
  }

  leave(id) {
    this.stopTyping();
    if (this.subscribed.has(id) && !this.holds(id) && !this.watching.has(id)) {
      this.act("unwatch", id);
      this.subscribed.delete(id);
    }
  }

  onSubscribed(frame) {
    const id = frame.conversation_id;
    this.subscribed.add(id);
    const thread = this.thread(id);
    thread.knowLast(frame.last_seq);
    thread.guestReadSeq = Math.max(thread.guestReadSeq, Number(frame.guest_read_seq) || 0);
    this.settle(id, this.holds(id) || frame.assigned_to === this.me ? ["claim", "watch"] : ["watch"]);
    this.fill(id);
    if (id === this.openId) {
      this.view.renderHeader();
      this.view.renderThread();
    }
  }

  // Ask for what the thread is missing: its newest page first, then any gap.
  fill(id) {
    if (this.historyPending.has(id) || !this.subscribed.has(id)) return;
    const thread = this.thread(id);
    const page = thread.firstPage() || thread.missing();
    if (page && this.send(staffFrames.history(id, page.after_seq, page.limit))) {
      this.historyPending.add(id);
    }
  }

  // Scrolling back: the page above what is held.
  loadOlder() {
    const id = this.openId;
    if (!id || this.historyPending.has(id)) return false;
    const page = this.thread(id).olderPage();
    if (!page || !this.send(staffFrames.history(id, page.after_seq, page.limit))) return false;
    this.historyPending.add(id);
    return true;
  }

  onHistory(frame) {
    const id = frame.conversation_id;
    this.historyPending.delete(id);
    const thread = this.thread(id);
    thread.knowLast(frame.last_seq);
    for (const message of frame.messages || []) thread.add(message);
    if (id === this.openId) {
      this.view.renderThread({ keepPosition: true });
      this.markRead();
    }
    this.fill(id);
  }

  onMessage(message) {
    const id = message.conversation_id;
    if (!this.subscribed.has(id)) return;
    const thread = this.thread(id);
    const added = thread.add(message);
    if (message.client_msg_id && this.outbox.find(message.client_msg_id)
        && message.sender === "staff") {
      this.outbox.remove(message.client_msg_id);
      this.saveOutbox();
    }
    if (!added) return;
    if (message.sender === "guest") this.guestTyping.delete(id);
    if (thread.missing()) this.fill(id);
    if (id === this.openId) {
      this.view.renderThread();
      this.view.renderTyping();
      this.markRead();
    }
  }

  onTyping(frame) {
    if (frame.sender !== "guest") return;
    if (frame.active) this.guestTyping.set(frame.conversation_id, true);
    else this.guestTyping.delete(frame.conversation_id);
    if (frame.conversation_id === this.openId) this.view.renderTyping();
  }

  onRead(frame) {
    if (frame.reader !== "guest") return;
    const thread = this.thread(frame.conversation_id);
    thread.guestReadSeq = Math.max(thread.guestReadSeq, Number(frame.seq) || 0);
    if (frame.conversation_id === this.openId) this.view.renderReadMark();
  }

  // The staff read mark (shared by all staff): everything shown has been seen.
  markRead() {
    const id = this.openId;
    if (!id || !this.subscribed.has(id) || document.visibilityState !== "visible") return;
    const highest = this.thread(id).highest;
    if (highest > (this.readSent.get(id) || 0)) {
      const entry = this.inbox.get(id);
      if (entry && entry.read_seq >= highest) return;
      if (this.send(staffFrames.read(id, highest))) this.readSent.set(id, highest);
    }
  }

  // -- actions --

  act(action, id) {
    if (!this.send(staffFrames.action(action, id))) return false;
    if (action !== "unwatch") this.pendingActions.push({ action, conversationId: id });
    return true;
  }

  settle(id, actions) {
    this.pendingActions = this.pendingActions.filter(
      (p) => !(p.conversationId === id && actions.includes(p.action)));
  }

  claim() { if (this.openId) this.act("claim", this.openId); }
  release() { if (this.openId) { this.stopTyping(); this.act("release", this.openId); } }
  resolve() { if (this.openId) { this.stopTyping(); this.act("resolve", this.openId); } }

  toggleWatch() {
    const id = this.openId;
    if (!id) return;
    if (this.watching.has(id)) this.watching.delete(id);
    else this.watching.add(id);
    this.view.renderHeader();
  }

  onError(frame) {
    const pending = this.outbox.find(frame.ref);
    if (pending) {
      if (frame.code === "rate_limited" || frame.code === "internal") {
        pending.sentOn = null; // not refused: try again a little later
        setTimeout(() => this.flush(), Number(frame.retry_after_ms) || 1000);
        return;
      }
      this.outbox.remove(pending.client_msg_id);
      this.saveOutbox();
      const entry = this.inbox.get(pending.conversation_id);
      this.failed.set(pending.client_msg_id, { ...pending, why: describeError(frame, entry, this.me) });
      if (pending.conversation_id === this.openId) this.view.renderThread();
      return;
    }
    let id = null;
    if (ACTIONS.has(frame.ref)) {
      const index = this.pendingActions.findIndex((p) => p.action === frame.ref);
      if (index >= 0) id = this.pendingActions.splice(index, 1)[0].conversationId;
    } else if (frame.code === "not_found") {
      id = frame.ref;
    } else if (frame.ref === "typing" || frame.ref === "read") {
      return; // a race with a hand-over: the next status frame says what happened
    }
    const entry = id ? this.inbox.get(id) : null;
    this.view.showNotice(describeError(frame, entry, this.me), id);
  }

  // -- replies --

  reply(text) {
    const id = this.openId;
    if (!id) return false;
    const checked = checkText(text);
    if (checked.error) {
      if (checked.error !== "empty") this.view.showNotice(checked.error, id);
      return false;
    }
    this.stopTyping();
    this.outbox.add(newClientMsgId(), checked.text, id);
    this.saveOutbox();
    this.view.renderThread();
    this.flush();
    return true;
  }

  pendingFor(id) {
    const waiting = this.outbox.items.filter((m) => m.conversation_id === id);
    const failed = [...this.failed.values()].filter((m) => m.conversation_id === id);
    return [...waiting, ...failed];
  }

  onAck(frame) {
    this.outbox.remove(frame.client_msg_id);
    this.saveOutbox();
  }

  // Send what waits, once per connection, in order, with its original id.
  flush() {
    if (!this.welcomed) return;
    for (const message of this.outbox.due(this.connection)) {
      const frame = staffFrames.message(message.conversation_id, message.client_msg_id, message.text);
      if (!this.send(frame)) return;
      message.sentOn = this.connection;
    }
  }

  saveOutbox() {
    localStorage.setItem(STAFF_OUTBOX_KEY, this.outbox.serialize());
  }

  // Typing: on while the reply box holds a reply (not a "/" lookup), off when it is
  // sent or emptied, or after a few idle seconds.
  typed(text) {
    const id = this.openId;
    const active = Boolean(id && this.holds(id) && text.trim() && !text.startsWith("/"));
    clearTimeout(this.typingTimer);
    if (!active) {
      this.stopTyping();
      return;
    }
    if (this.typingOn !== id && this.send(staffFrames.typing(id, true))) this.typingOn = id;
    this.typingTimer = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.typingTimer);
    if (this.typingOn) this.send(staffFrames.typing(this.typingOn, false));
    this.typingOn = null;
  }

  signOut() {
    this.stopTyping();
    this.stop();
    localStorage.removeItem(STAFF_TOKEN_KEY);
    localStorage.removeItem(STAFF_OUTBOX_KEY);
  }
}
