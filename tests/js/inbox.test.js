// The staff console's inbox: order, filters, unread counts, waiting times, error words.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  describeError, FILTERS, guestLabel, Inbox, waitedFor,
} from "../../trio_chat/server/static/inbox.js";

const T0 = Date.parse("2026-12-01T09:00:00.000Z");
const iso = (ms) => new Date(ms).toISOString();

function entry(id, fields = {}) {
  return {
    conversation_id: id, guest_id: `g_${id}`, guest_name: null, guest_room: null,
    status: "ai", assigned_to: null, last_seq: 1, read_seq: 0,
    updated_ts: iso(T0), guest_online: false, preview: "hello", ...fields,
  };
}

test("the guest is shown by name and room, else by id", () => {
  assert.equal(guestLabel(entry("c1", { guest_name: "Maria Lopez", guest_room: "412" })),
    "Maria Lopez · 412");
  assert.equal(guestLabel(entry("c1", { guest_name: "Maria Lopez" })), "Maria Lopez");
  assert.equal(guestLabel(entry("c1", { guest_room: "12" })), "g_c1 · 12");
  assert.equal(guestLabel(entry("c1")), "g_c1");
});

test("waiting times read as seconds, minutes, then hours", () => {
  assert.equal(waitedFor(-5), "0 s");
  assert.equal(waitedFor(59_999), "59 s");
  assert.equal(waitedFor(60_000), "1 min");
  assert.equal(waitedFor(59 * 60_000 + 59_000), "59 min");
  assert.equal(waitedFor(65 * 60_000), "1 h 05 min");
});

test("waiting guests come first, the longest wait first; the rest newest first", () => {
  const inbox = new Inbox();
  inbox.replace([
    entry("old-ai", { updated_ts: iso(T0 - 60_000) }),
    entry("new-ai", { updated_ts: iso(T0 + 60_000) }),
    entry("late", { status: "waiting", updated_ts: iso(T0 + 30_000) }),
    entry("early", { status: "waiting", updated_ts: iso(T0 - 600_000) }),
    entry("held", { status: "staff", assigned_to: "Anna", updated_ts: iso(T0 + 90_000) }),
  ]);
  assert.deepEqual(inbox.list("all", "Anna", T0).map((e) => e.conversation_id),
    ["early", "late", "held", "new-ai", "old-ai"]);
  assert.deepEqual(inbox.list("waiting", "Anna", T0).map((e) => e.conversation_id),
    ["early", "late"]);
  assert.equal(inbox.waiting, 2);
});

test("a new guest message does not reset how long someone has waited", () => {
  const inbox = new Inbox();
  inbox.replace([]);
  assert.equal(inbox.update(entry("c1", { status: "waiting", updated_ts: iso(T0) })), true);
  assert.equal(inbox.update(entry("c1", { status: "waiting", updated_ts: iso(T0 + 120_000),
    last_seq: 4 })), false);
  assert.equal(inbox.waitedMs("c1", T0 + 180_000), 180_000);
  // Claimed, then handed back: a new wait starts.
  inbox.update(entry("c1", { status: "staff", assigned_to: "Anna" }));
  assert.equal(inbox.waitedMs("c1", T0), null);
  assert.equal(inbox.update(entry("c1", { status: "waiting", updated_ts: iso(T0 + 300_000) })), true);
  assert.equal(inbox.waitedMs("c1", T0 + 360_000), 60_000);
});

test("the first queue is not news, a later one names who started waiting meanwhile", () => {
  const inbox = new Inbox();
  assert.deepEqual(inbox.replace([entry("a", { status: "waiting" })]), []);
  // A reconnect's queue: a still waits (old news), b started waiting while we were away.
  assert.deepEqual(inbox.replace([entry("a", { status: "waiting" }),
    entry("b", { status: "waiting" })]), ["b"]);
});

test("a reconnect's queue drops what the server no longer lists but keeps today's resolved", () => {
  const inbox = new Inbox();
  inbox.replace([entry("gone"), entry("done", { status: "resolved" })]);
  inbox.replace([entry("new")]);
  assert.deepEqual([...inbox.entries.keys()].sort(), ["done", "new"]);
});

test("filters: mine, waiting, with the concierge, resolved today", () => {
  const inbox = new Inbox();
  inbox.replace([
    entry("mine", { status: "staff", assigned_to: "Anna" }),
    entry("bens", { status: "staff", assigned_to: "Ben" }),
    entry("ai"),
    entry("visitor", { last_seq: 0 }), // opened the page, never wrote, gone
    entry("here", { last_seq: 0, guest_online: true }),
    entry("today", { status: "resolved", updated_ts: iso(T0) }),
    entry("yesterday", { status: "resolved", updated_ts: iso(T0 - 86_400_000) }),
  ]);
  const ids = (filter) => inbox.list(filter, "Anna", T0).map((e) => e.conversation_id).sort();
  assert.deepEqual(ids("mine"), ["mine"]);
  assert.deepEqual(ids("concierge"), ["ai", "here"]);
  assert.deepEqual(ids("resolved"), ["today"]);
  assert.equal(ids("all").includes("visitor"), false);
  const counts = inbox.counts("Anna", T0);
  assert.deepEqual(Object.keys(counts), [...FILTERS]);
  assert.equal(counts.mine, 1);
  assert.equal(counts.waiting, 0);
});

test("unread counts what came after the staff read mark", () => {
  const inbox = new Inbox();
  assert.equal(inbox.unread(entry("c", { last_seq: 7, read_seq: 4 })), 3);
  assert.equal(inbox.unread(entry("c", { last_seq: 4, read_seq: 4 })), 0);
  assert.equal(inbox.unread(entry("c", { last_seq: 4, read_seq: 9 })), 0);
});

test("a conflict is told in words, naming who was first", () => {
  const ben = entry("c", { status: "staff", assigned_to: "Ben" });
  const frame = { type: "error", code: "conflict", message: "Ben already holds this conversation", ref: "claim" };
  assert.equal(describeError(frame, ben, "Anna"),
    "Ben claimed this conversation first. It is theirs now; you can still watch.");
  // The summary has not arrived yet: the server's words still name them.
  assert.match(describeError(frame, entry("c", { status: "waiting" }), "Anna"), /^Ben claimed/);
  assert.equal(describeError({ code: "conflict", message: "" }, null, "Anna"),
    "Someone else claimed this conversation first.");
  assert.match(describeError({ code: "forbidden", message: "x" }, null, "Anna"), /^Claim the conversation first/);
  assert.doesNotMatch(describeError({ code: "not_found", message: "no c_1" }), /not_found/);
});
