// Drawing the staff console: the page's DOM, and nothing else. Every string a guest or
// the server supplied is set as text, never as markup.
import { FILTER_NAMES, FILTERS, guestLabel, waitedFor } from "./inbox.js";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const STATUS_WORDS = {
  ai: "With the concierge",
  waiting: "Waiting for the team",
  staff: "With",
  resolved: "Resolved",
};

export class StaffView {
  constructor() {
    this.desk = null; // set by staff.js
    this.filter = "all"; // waiting guests come first in every list
    this.selected = null; // the inbox row with the keyboard focus
    this.status = $("status");
    this.statusText = this.status.querySelector(".status-text");
    this.list = $("inbox");
    this.messages = $("messages");
    this.log = $("log");
    this.input = $("input");
    this.onAlert = () => {};
    this.onInboxChange = () => {};
    this.drawFilters();
  }

  // -- frame of the page --

  setStatus(state, words) {
    this.status.dataset.state = state;
    this.statusText.textContent = words;
  }

  signedIn(name) {
    $("signin").hidden = true;
    $("desk").hidden = false;
    $("me").textContent = name;
  }

  signedOut(why) {
    $("desk").hidden = true;
    $("signin").hidden = false;
    const message = $("signin-message");
    message.textContent = why;
    message.hidden = false;
  }

  showNotice(text, conversationId = null) {
    const notice = conversationId && conversationId === this.desk.openId
      ? $("conv-notice") : $("notice");
    notice.textContent = text;
    notice.hidden = false;
  }

  hideNotice() {
    for (const id of ["notice", "conv-notice"]) {
      $(id).hidden = true;
      $(id).textContent = "";
    }
  }

  alert(entry) {
    if (entry) this.onAlert(entry);
  }

  // -- the inbox --

  drawFilters() {
    const tabs = $("filters");
    for (const filter of FILTERS) {
      const tab = el("button", "filter");
      tab.type = "button";
      tab.id = `filter-${filter}`;
      tab.setAttribute("role", "tab");
      tab.dataset.filter = filter;
      tab.append(el("span", "filter-name", FILTER_NAMES[filter]), el("span", "count", "0"));
      tab.addEventListener("click", () => this.setFilter(filter));
      tabs.append(tab);
    }
  }

  setFilter(filter) {
    this.filter = filter;
    this.renderInbox();
  }

  renderInbox() {
    const desk = this.desk;
    const now = Date.now();
    const counts = desk.inbox.counts(desk.me, now);
    for (const tab of $("filters").children) {
      const filter = tab.dataset.filter;
      tab.querySelector(".count").textContent = String(counts[filter]);
      tab.setAttribute("aria-selected", String(filter === this.filter));
      tab.tabIndex = filter === this.filter ? 0 : -1;
      tab.setAttribute("aria-label", `${FILTER_NAMES[filter]}: ${counts[filter]}`);
    }
    const entries = desk.inbox.list(this.filter, desk.me, now);
    const focused = document.activeElement && this.list.contains(document.activeElement);
    if (!entries.some((e) => e.conversation_id === this.selected)) {
      this.selected = entries.length ? entries[0].conversation_id : null;
    }
    const rows = entries.map((entry) => this.row(entry, now));
    this.list.replaceChildren(...rows);
    $("empty").hidden = entries.length > 0;
    $("empty").textContent = this.filter === "waiting" ? "Nobody is waiting." : "Nothing here.";
    if (focused) this.focusSelected();
    this.onInboxChange();
  }

  row(entry, now) {
    const desk = this.desk;
    const id = entry.conversation_id;
    const item = el("li", "row");
    item.id = `row-${id}`;
    item.dataset.id = id;
    item.dataset.status = entry.status;
    item.setAttribute("role", "option");
    item.setAttribute("aria-selected", String(id === desk.openId));
    item.tabIndex = id === this.selected ? 0 : -1;
    const top = el("div", "row-top");
    const who = el("span", "guest", guestLabel(entry));
    top.append(who);
    if (entry.guest_online) top.append(el("span", "online", "online"));
    const waited = desk.inbox.waitedMs(id, now);
    const when = el("span", "when");
    if (waited !== null) {
      when.classList.add("waited");
      when.dataset.since = String(now - waited);
      when.textContent = `waiting ${waitedFor(waited)}`;
    } else {
      when.textContent = entry.status === "staff" ? `with ${entry.assigned_to}`
        : STATUS_WORDS[entry.status] || entry.status;
    }
    top.append(when);
    const bottom = el("div", "row-bottom");
    bottom.append(el("span", "preview", entry.preview || "(no messages yet)"));
    const unread = desk.inbox.unread(entry);
    if (unread > 0) {
      const badge = el("span", "unread", String(unread));
      badge.setAttribute("aria-label", `${unread} unread`);
      bottom.append(badge);
    }
    item.append(top, bottom);
    item.addEventListener("click", () => { this.selected = id; this.open(id); });
    return item;
  }

  // The waiting times tick without redrawing the list.
  tick() {
    const now = Date.now();
    for (const span of this.list.querySelectorAll(".waited")) {
      span.textContent = `waiting ${waitedFor(now - Number(span.dataset.since))}`;
    }
  }

  focusSelected() {
    const row = this.selected && document.getElementById(`row-${this.selected}`);
    if (row) row.focus();
  }

  moveSelection(step) {
    const rows = [...this.list.children];
    if (!rows.length) return;
    let index = rows.findIndex((r) => r.dataset.id === this.selected);
    index = step === Infinity ? rows.length - 1 : step === -Infinity ? 0
      : Math.min(rows.length - 1, Math.max(0, index + step));
    for (const row of rows) row.tabIndex = -1;
    rows[index].tabIndex = 0;
    this.selected = rows[index].dataset.id;
    rows[index].focus();
  }

  open(id) {
    document.body.dataset.view = "conversation"; // narrow screens show one pane
    this.desk.open(id);
    this.input.focus();
  }

  back() {
    document.body.dataset.view = "inbox";
    this.desk.close();
    this.focusSelected();
  }

  renderPresence() {
    const desk = this.desk;
    const list = $("duty");
    list.replaceChildren(...desk.onDuty.map((name) =>
      el("li", name === desk.me ? "me" : "", name === desk.me ? `${name} (you)` : name)));
  }

  // -- a conversation --

  renderConversation() {
    const open = Boolean(this.desk.openId);
    $("placeholder").hidden = open;
    $("thread-view").hidden = !open;
    if (!open) return;
    this.renderHeader();
    this.renderThread({ toEnd: true });
    this.renderTyping();
  }

  renderHeader() {
    const desk = this.desk;
    const id = desk.openId;
    if (!id) return;
    const entry = desk.inbox.get(id) || { conversation_id: id, guest_id: "", status: "ai" };
    $("guest").textContent = guestLabel(entry);
    const holds = desk.holds(id);
    let words = STATUS_WORDS[entry.status] || entry.status;
    if (entry.status === "staff") words = holds ? "With you" : `With ${entry.assigned_to}`;
    $("conv-status").textContent = words;
    $("conv-status").dataset.status = entry.status;
    $("claim").hidden = holds;
    $("claim").disabled = entry.status === "staff" && !holds;
    $("release").hidden = !holds;
    $("resolve").hidden = !holds;
    const watching = desk.watching.has(id);
    $("watch").setAttribute("aria-pressed", String(watching));
    $("watch").textContent = watching ? "Watching" : "Watch";
    $("send").disabled = !holds;
    this.input.placeholder = holds ? "Reply to the guest… (type / for canned replies)"
      : "Claim the conversation to reply";
  }

  renderThread({ keepPosition = false, toEnd = false } = {}) {
    const desk = this.desk;
    const id = desk.openId;
    if (!id) return;
    const thread = desk.thread(id);
    const entry = desk.inbox.get(id);
    const log = this.log;
    const nearEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    const fromBottom = log.scrollHeight - log.scrollTop;
    const items = thread.messages().map((m) => this.message(m, entry));
    for (const pending of desk.pendingFor(id)) {
      const item = this.message({ sender: "staff", author: desk.me, text: pending.text }, entry);
      item.dataset.cmid = pending.client_msg_id;
      item.querySelector(".meta").textContent = pending.why ? `Not sent: ${pending.why}` : "Sending…";
      if (pending.why) item.dataset.failed = "true";
      items.push(item);
    }
    this.messages.replaceChildren(...items);
    $("older").textContent = thread.atBeginning ? "The beginning of the conversation"
      : "Scroll up for earlier messages";
    this.renderReadMark();
    if (keepPosition && !nearEnd) log.scrollTop = log.scrollHeight - fromBottom;
    else if (toEnd || nearEnd) log.scrollTop = log.scrollHeight;
  }

  message(message, entry) {
    const item = el("li", "msg");
    item.dataset.sender = message.sender;
    if (message.seq) item.dataset.seq = String(message.seq);
    const names = {
      guest: entry ? guestLabel(entry) : "Guest",
      ai: "Concierge",
      staff: message.author === this.desk.me ? "You" : (message.author || "Staff"),
    };
    if (names[message.sender]) item.append(el("span", "who", names[message.sender]));
    item.append(el("span", "body", message.text));
    const meta = el("span", "meta");
    if (message.ts) {
      meta.textContent = new Date(message.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }
    item.append(meta);
    return item;
  }

  // "Read by the guest up to here": after the last message the guest has seen.
  renderReadMark() {
    const desk = this.desk;
    const id = desk.openId;
    if (!id) return;
    const seq = desk.thread(id).guestReadSeq;
    for (const old of this.messages.querySelectorAll(".read-mark")) old.remove();
    let last = null;
    for (const item of this.messages.querySelectorAll(".msg[data-seq]")) {
      const seen = Number(item.dataset.seq) <= seq;
      item.dataset.guestRead = String(seen);
      if (seen) last = item;
    }
    if (last && last.nextElementSibling) {
      const mark = el("li", "read-mark", "The guest has read up to here");
      mark.setAttribute("role", "separator");
      last.after(mark);
    } else if (last) {
      const mark = el("li", "read-mark", "Seen by the guest");
      mark.setAttribute("role", "separator");
      last.after(mark);
    }
  }

  renderTyping() {
    const desk = this.desk;
    const id = desk.openId;
    const typing = $("typing");
    const active = Boolean(id && desk.guestTyping.get(id));
    const entry = id ? desk.inbox.get(id) : null;
    typing.textContent = active ? `${entry ? entry.guest_name || "The guest" : "The guest"} is typing…` : "";
    typing.hidden = !active;
  }

  // -- canned replies --

  showCanned(replies, selected) {
    const list = $("canned");
    if (!replies.length) {
      this.hideCanned();
      return;
    }
    list.replaceChildren(...replies.map((reply, index) => {
      const option = el("li", "canned-option");
      option.id = `canned-${index}`;
      option.setAttribute("role", "option");
      option.setAttribute("aria-selected", String(index === selected));
      option.append(el("strong", "", reply.title), el("span", "", reply.text));
      option.addEventListener("mousedown", (event) => {
        event.preventDefault(); // keep the focus in the reply box
        this.onPickCanned(reply);
      });
      return option;
    }));
    list.hidden = false;
    this.input.setAttribute("aria-expanded", "true");
    this.input.setAttribute("aria-activedescendant", `canned-${selected}`);
  }

  hideCanned() {
    $("canned").hidden = true;
    $("canned").replaceChildren();
    this.input.setAttribute("aria-expanded", "false");
    this.input.removeAttribute("aria-activedescendant");
  }
}
