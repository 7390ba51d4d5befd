// The staff console's inbox: every conversation the server reported (queue entries),
// in the order a front desk works them, filtered, with unread counts and waiting times.
// Pure: no DOM, no socket, the time is a parameter (tested with node --test).

export const FILTERS = Object.freeze(["waiting", "mine", "concierge", "resolved", "all"]);
export const FILTER_NAMES = Object.freeze({
  waiting: "Waiting",
  mine: "Mine",
  concierge: "With the concierge",
  resolved: "Resolved today",
  all: "All",
});

const ts = (entry) => Date.parse(entry.updated_ts) || 0;

// "Maria Lopez · 412": the name the guest gave (else their id) and the room, if given.
export function guestLabel(entry) {
  const who = entry.guest_name || entry.guest_id;
  return entry.guest_room ? `${who} · ${entry.guest_room}` : who;
}

// How long someone has waited, in words that fit a list row.
export function waitedFor(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  return `${hours} h ${String(minutes % 60).padStart(2, "0")} min`;
}

export function sameDay(a, b) {
  const x = new Date(a);
  const y = new Date(b);
  return x.getFullYear() === y.getFullYear() && x.getMonth() === y.getMonth()
    && x.getDate() === y.getDate();
}

export class Inbox {
  constructor() {
    this.entries = new Map(); // conversation_id -> the latest queue entry
    this.waitingSince = new Map(); // conversation_id -> ms, while waiting
    this.loaded = false; // a queue has arrived once
  }

  // A `queue` frame (every sign-in, reconnects included). Returns the ids that started
  // waiting since we last knew: none on the very first queue, which is the inbox as
  // found, not news.
  replace(entries) {
    const fresh = [];
    const first = !this.loaded;
    const seen = new Set();
    for (const entry of entries) {
      seen.add(entry.conversation_id);
      if (this.put(entry) && !first) fresh.push(entry.conversation_id);
    }
    // What the queue no longer lists is gone from the server's view (an old ai chat),
    // except what this console saw resolved today, which the queue never lists.
    for (const [id, entry] of this.entries) {
      if (!seen.has(id) && entry.status !== "resolved") {
        this.entries.delete(id);
        this.waitingSince.delete(id);
      }
    }
    this.loaded = true;
    return fresh;
  }

  // A `conversation` frame. Returns true when the guest has just started waiting.
  update(entry) {
    return this.put(entry);
  }

  put(entry) {
    const id = entry.conversation_id;
    const before = this.entries.get(id);
    this.entries.set(id, entry);
    if (entry.status !== "waiting") {
      this.waitingSince.delete(id);
      return false;
    }
    if (before && before.status === "waiting" && this.waitingSince.has(id)) return false;
    // The escalation's own commit set updated_ts: the wait started then. Later
    // guest messages move updated_ts, never the start of the wait.
    this.waitingSince.set(id, ts(entry));
    return true;
  }

  get(id) {
    return this.entries.get(id) || null;
  }

  // Messages after the staff read mark (shared by all staff).
  unread(entry) {
    return Math.max(0, (Number(entry.last_seq) || 0) - (Number(entry.read_seq) || 0));
  }

  matches(entry, filter, me, now) {
    switch (filter) {
      case "waiting": return entry.status === "waiting";
      case "mine": return entry.status === "staff" && entry.assigned_to === me;
      case "concierge":
        // A visitor who opened the page and never wrote is not a conversation yet.
        return entry.status === "ai" && (entry.last_seq > 0 || entry.guest_online);
      case "resolved": return entry.status === "resolved" && sameDay(ts(entry), now);
      default: return entry.status !== "ai" || entry.last_seq > 0 || entry.guest_online;
    }
  }

  // Waiting guests first, the longest wait first; then everything else, newest first.
  list(filter, me, now) {
    const found = [...this.entries.values()].filter((e) => this.matches(e, filter, me, now));
    return found.sort((a, b) => {
      const aw = this.waitingSince.has(a.conversation_id);
      const bw = this.waitingSince.has(b.conversation_id);
      if (aw !== bw) return aw ? -1 : 1;
      if (aw) {
        return this.waitingSince.get(a.conversation_id) - this.waitingSince.get(b.conversation_id)
          || a.conversation_id.localeCompare(b.conversation_id);
      }
      return ts(b) - ts(a) || a.conversation_id.localeCompare(b.conversation_id);
    });
  }

  counts(me, now) {
    const counts = {};
    for (const filter of FILTERS) counts[filter] = 0;
    for (const entry of this.entries.values()) {
      for (const filter of FILTERS) if (this.matches(entry, filter, me, now)) counts[filter] += 1;
    }
    return counts;
  }

  get waiting() {
    return this.waitingSince.size;
  }

  waitedMs(id, now) {
    return this.waitingSince.has(id) ? now - this.waitingSince.get(id) : null;
  }
}

// An error frame in words a person at the desk understands. `entry`: the
// conversation's queue entry if known; `me`: the console's own name.
export function describeError(frame, entry = null, me = null) {
  const holder = entry && entry.status === "staff" && entry.assigned_to !== me
    ? entry.assigned_to : null;
  switch (frame.code) {
    case "conflict": {
      const who = holder || String(frame.message || "").replace(/ already holds.*$/, "");
      return who && who !== frame.message
        ? `${who} claimed this conversation first. It is theirs now; you can still watch.`
        : "Someone else claimed this conversation first.";
    }
    case "forbidden":
      return holder
        ? `${holder} holds this conversation: only they can do that.`
        : "Claim the conversation first: only the person holding it can do that.";
    case "not_found": return "This conversation does not exist (any more).";
    case "rate_limited": return "Slow down a little: too many messages at once.";
    case "internal": return "The server could not store that. Please try again.";
    case "too_large": return "That message is too long.";
    default: return frame.message || `The server refused that (${frame.code}).`;
  }
}
