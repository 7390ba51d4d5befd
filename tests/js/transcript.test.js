// What the page holds: messages in seq order with nothing missing, and the outbox.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Outbox, Transcript } from "../../trio_chat/server/static/transcript.js";

const message = (seq) => ({ seq, text: `m${seq}` });

test("the transcript holds a contiguous prefix and parks what lies beyond a gap", () => {
  const transcript = new Transcript();
  assert.equal(transcript.add(message(1)), true);
  assert.equal(transcript.add(message(3)), true);
  assert.equal(transcript.held, 1);
  assert.equal(transcript.gap, true);
  assert.equal(transcript.add(message(2)), true);
  assert.equal(transcript.held, 3);
  assert.equal(transcript.gap, false);
  assert.equal(transcript.add(message(2)), false); // history and pushes overlap
});

test("the outbox sends each message once per connection, in order", () => {
  const outbox = new Outbox();
  outbox.add("a", "first");
  outbox.add("b", "second");
  assert.deepEqual(outbox.due(1).map((m) => m.client_msg_id), ["a", "b"]);
  outbox.items[0].sentOn = 1;
  assert.deepEqual(outbox.due(1).map((m) => m.client_msg_id), ["b"]);
  assert.deepEqual(outbox.due(2).map((m) => m.client_msg_id), ["a", "b"]); // a reconnect resends
  assert.equal(outbox.remove("a").text, "first");
  assert.equal(outbox.find("a"), null);
});

test("the outbox survives a reload, and a corrupt one is dropped, not fatal", () => {
  const outbox = new Outbox();
  outbox.add("a", "first").sentOn = 4;
  const again = Outbox.parse(outbox.serialize());
  assert.deepEqual(again.items, [{ client_msg_id: "a", text: "first", sentOn: null }]);
  for (const bad of ["{", "null", '{"a":1}', '[{"client_msg_id":7}]']) {
    assert.deepEqual(Outbox.parse(bad).items, [], bad);
  }
  assert.deepEqual(Outbox.parse(null).items, []);
});
