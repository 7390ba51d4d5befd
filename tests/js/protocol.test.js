// The page's protocol module: close codes, the frames a guest sends, reading frames.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  CLOSE, MAX_TEXT, checkText, frames, newClientMsgId, parseFrame,
} from "../../trio_chat/server/static/protocol.js";

test("close codes are the contract's", () => {
  assert.deepEqual(
    [CLOSE.NORMAL, CLOSE.GOING_AWAY, CLOSE.RESTARTING, CLOSE.TRY_LATER],
    [1000, 1001, 1012, 1013],
  );
  assert.deepEqual([CLOSE.AUTH_FAILED, CLOSE.HELLO_TIMEOUT, CLOSE.RATE_LIMITED], [4401, 4408, 4429]);
  assert.throws(() => { CLOSE.NORMAL = 1; });
});

test("frames are built as protocol v1 names them", () => {
  assert.deepEqual(frames.hello(undefined), { type: "hello", token: null });
  assert.deepEqual(frames.hello("g.x.y"), { type: "hello", token: "g.x.y" });
  assert.deepEqual(frames.message("w-1", "hi"), { type: "message", client_msg_id: "w-1", text: "hi" });
  assert.deepEqual(frames.history(7), { type: "history", after_seq: 7, limit: 500 });
  assert.deepEqual(frames.escalate(), { type: "escalate" });
  assert.deepEqual(frames.escalate("why"), { type: "escalate", reason: "why" });
  assert.deepEqual(frames.typing(1), { type: "typing", active: true });
  assert.deepEqual(frames.read(3), { type: "read", seq: 3 });
  assert.deepEqual(frames.ping(2), { type: "ping", id: 2 });
});

test("only JSON objects with a string type are frames", () => {
  assert.deepEqual(parseFrame('{"type":"ack","seq":1}'), { type: "ack", seq: 1 });
  for (const raw of ["not json", "[1,2]", "null", '{"type":5}', '{"seq":1}', '"ack"']) {
    assert.equal(parseFrame(raw), null, raw);
  }
});

test("text is trimmed, and empty or overlong text is refused with a reason", () => {
  assert.deepEqual(checkText("  hello  "), { text: "hello" });
  assert.deepEqual(checkText(" \n "), { error: "empty" });
  assert.match(checkText("x".repeat(MAX_TEXT + 1)).error, /at most 4000/);
  assert.deepEqual(checkText("x".repeat(MAX_TEXT)), { text: "x".repeat(MAX_TEXT) });
});

test("client message ids stay in the protocol's alphabet and length", () => {
  const id = newClientMsgId(() => "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed");
  assert.equal(id, "w-1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed");
  assert.match(newClientMsgId(() => "a/b c?".repeat(30)), /^[A-Za-z0-9._-]{1,64}$/);
  assert.match(newClientMsgId(null), /^w-[A-Za-z0-9._-]+$/);
  assert.notEqual(newClientMsgId(), newClientMsgId());
});
