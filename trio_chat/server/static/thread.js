// One conversation as a staff console holds it: a window of messages by seq that grows
// downwards live and upwards a page at a time as staff scroll back, and says which
// history request fills what is missing. Pure (tested with node --test).

export const PAGE = 50;

export class Thread {
  constructor(conversationId) {
    this.conversationId = conversationId;
    this.stored = new Map(); // seq -> message
    this.lowest = 0; // the lowest seq held (0: nothing yet)
    this.highest = 0; // the highest seq held with nothing missing from lowest up to it
    this.lastSeq = 0; // the highest seq the server has told us exists
    this.guestReadSeq = 0;
  }

  // Take a message; false when it is one we already hold.
  add(message) {
    const seq = Number(message.seq);
    if (!Number.isInteger(seq) || seq < 1 || this.stored.has(seq)) return false;
    this.stored.set(seq, message);
    this.lastSeq = Math.max(this.lastSeq, seq);
    if (this.lowest === 0 || seq < this.lowest) {
      this.lowest = seq;
      this.highest = seq;
    }
    while (this.stored.has(this.highest + 1)) this.highest += 1;
    return true;
  }

  knowLast(seq) {
    this.lastSeq = Math.max(this.lastSeq, Number(seq) || 0);
  }

  // The first page to ask for when a conversation opens: its newest messages.
  firstPage(size = PAGE) {
    if (this.lowest !== 0 || this.lastSeq === 0) return null;
    const after = Math.max(0, this.lastSeq - size);
    return { after_seq: after, limit: this.lastSeq - after };
  }

  // The page above what is held (scrolling back), or null at the beginning.
  olderPage(size = PAGE) {
    if (this.lowest <= 1) return null;
    const after = Math.max(0, this.lowest - 1 - size);
    return { after_seq: after, limit: this.lowest - 1 - after };
  }

  // What is missing below the newest message we know of (a reconnect, a gap in live
  // pushes), as a request after `highest`; null when nothing is.
  missing(limit = 500) {
    if (this.lowest === 0) return null; // firstPage covers it
    const beyond = [...this.stored.keys()].some((seq) => seq > this.highest);
    if (this.highest >= this.lastSeq && !beyond) return null;
    return { after_seq: this.highest, limit };
  }

  get atBeginning() {
    return this.lowest === 1 || this.lastSeq === 0;
  }

  // The held messages in seq order.
  messages() {
    return [...this.stored.values()].sort((a, b) => a.seq - b.seq);
  }
}
