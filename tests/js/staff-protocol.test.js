// What the staff console adds to the shared modules: a guest's name and room in hello,
// the staff frames, and an outbox whose messages name their conversation.
import assert from "node:assert/strict";
import { test } from "node:test";

import { frames, staffFrames } from "../../trio_chat/server/static/protocol.js";
import { Outbox } from "../../trio_chat/server/static/transcript.js";

test("a new guest's hello carries the name and room given, trimmed, and nothing empty", () => {
  assert.deepEqual(frames.hello(null, { name: " Maria Lopez ", room: " 412 " }),
    { type: "hello", token: null, name: "Maria Lopez", room: "412" });
  assert.deepEqual(frames.hello(null, { name: "", room: "  " }), { type: "hello", token: null });
  assert.deepEqual(frames.hello(null, { room: "Garden Suite 1234567890" }).room, "Garden Suite 1234567");
  assert.equal(frames.hello(null, { name: "x".repeat(200) }).name.length, 80);
});

test("staff frames name the conversation", () => {
  assert.deepEqual(staffFrames.message("c_1", "w-1", "hi"),
    { type: "message", conversation_id: "c_1", client_msg_id: "w-1", text: "hi" });
  assert.deepEqual(staffFrames.history("c_1", 70, 50),
    { type: "history", conversation_id: "c_1", after_seq: 70, limit: 50 });
  assert.deepEqual(staffFrames.typing("c_1", 1), { type: "typing", conversation_id: "c_1", active: true });
  assert.deepEqual(staffFrames.read("c_1", 4), { type: "read", conversation_id: "c_1", seq: 4 });
  for (const action of ["claim", "release", "resolve", "watch", "unwatch"]) {
    assert.deepEqual(staffFrames.action(action, "c_1"), { type: action, conversation_id: "c_1" });
  }
});

test("an outbox keeps each message's conversation across a reload; a guest's has none", () => {
  const outbox = new Outbox();
  outbox.add("w-1", "Sending someone up", "c_1");
  outbox.add("w-2", "guest text");
  const saved = outbox.serialize();
  assert.deepEqual(JSON.parse(saved), [
    { client_msg_id: "w-1", text: "Sending someone up", conversation_id: "c_1" },
    { client_msg_id: "w-2", text: "guest text" },
  ]);
  const again = Outbox.parse(saved);
  assert.equal(again.find("w-1").conversation_id, "c_1");
  assert.equal("conversation_id" in again.find("w-2"), false);
  assert.equal(again.find("w-1").sentOn, null);
});
