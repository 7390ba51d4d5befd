// Drawing the chat: the page's DOM, and nothing else. Every guest-supplied string is
// set as text, never as markup.

const $ = (id) => document.getElementById(id);

export class View {
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

  // The concierge's answer as it is written: one bubble at the end of the list, as
  // text, replaced by the stored message when that arrives.
  setDraft(text) {
    let item = this.messages.querySelector("li.draft");
    if (!item) {
      item = this.element({ sender: "ai", text: "" });
      item.classList.add("draft");
      item.setAttribute("aria-busy", "true");
      this.messages.append(item);
    }
    item.querySelector(".body").textContent = text;
    item.querySelector(".meta").textContent = "writing…";
    this.setTyping("");
    item.scrollIntoView({ block: "end" });
  }

  clearDraft() {
    this.messages.querySelector("li.draft")?.remove();
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
