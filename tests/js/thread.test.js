// One conversation in the staff console: paged upwards, filled after gaps.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Thread } from "../../trio_chat/server/static/thread.js";

const msg = (seq) => ({ seq, conversation_id: "c", sender: "guest", text: `m${seq}` });

test("opening asks for the newest page, scrolling back for the page above", () => {
  const thread = new Thread("c");
  assert.equal(thread.firstPage(), null); // nothing known yet
  thread.knowLast(120);
  assert.deepEqual(thread.firstPage(50), { after_seq: 70, limit: 50 });
  for (let seq = 71; seq <= 120; seq += 1) thread.add(msg(seq));
  assert.equal(thread.firstPage(50), null);
  assert.deepEqual(thread.olderPage(50), { after_seq: 20, limit: 50 });
  for (let seq = 21; seq <= 70; seq += 1) thread.add(msg(seq));
  assert.deepEqual(thread.olderPage(50), { after_seq: 0, limit: 20 });
  for (let seq = 1; seq <= 20; seq += 1) thread.add(msg(seq));
  assert.equal(thread.olderPage(50), null);
  assert.equal(thread.atBeginning, true);
  assert.deepEqual(thread.messages().map((m) => m.seq), Array.from({ length: 120 }, (_, i) => i + 1));
});

test("a short conversation is one page from the start", () => {
  const thread = new Thread("c");
  thread.knowLast(3);
  assert.deepEqual(thread.firstPage(50), { after_seq: 0, limit: 3 });
});

test("live messages before the first page, duplicates and gaps", () => {
  const thread = new Thread("c");
  thread.knowLast(10);
  assert.equal(thread.add(msg(11)), true); // pushed before history came back
  assert.equal(thread.add(msg(11)), false);
  for (let seq = 1; seq <= 10; seq += 1) thread.add(msg(seq));
  assert.equal(thread.highest, 11);
  assert.equal(thread.missing(), null);
  thread.add(msg(14)); // 12 and 13 were missed (a reconnect)
  assert.deepEqual(thread.missing(), { after_seq: 11, limit: 500 });
  thread.add(msg(12));
  thread.add(msg(13));
  assert.equal(thread.missing(), null);
  thread.knowLast(16); // subscribed again: more exists than we hold
  assert.deepEqual(thread.missing(), { after_seq: 14, limit: 500 });
  assert.equal(thread.add({ seq: 0 }), false);
  assert.equal(thread.add({ seq: "x" }), false);
});
