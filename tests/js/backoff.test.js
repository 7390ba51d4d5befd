// The page's retry policy: full jitter, a wide first retry, the server's hints.
import assert from "node:assert/strict";
import { test } from "node:test";

import { BACKOFF, HINT_JITTER, ceiling, retryDelay } from "../../trio_chat/server/static/backoff.js";
import { CLOSE } from "../../trio_chat/server/static/protocol.js";

const fixed = (value) => () => value;

test("the ceiling doubles from 0.5 s up to 30 s", () => {
  assert.deepEqual([1, 2, 3, 4, 7, 20].map((n) => ceiling(n)), [500, 1000, 2000, 4000, 30000, 30000]);
});

test("the first retry after a healthy connection is spread over 5 s", () => {
  assert.equal(retryDelay({ attempt: 1, code: CLOSE.ABNORMAL, random: fixed(0.9) }), 4500);
  assert.equal(retryDelay({ attempt: 1, code: CLOSE.ABNORMAL, random: fixed(0) }), 0);
});

test("later retries are uniform below the ceiling (full jitter)", () => {
  for (const r of [0, 0.25, 0.999]) {
    assert.equal(retryDelay({ attempt: 4, code: CLOSE.ABNORMAL, random: fixed(r) }), r * 4000);
  }
});

test("a restart's hint replaces the backoff, with at most 0.5 s of our own", () => {
  for (const code of [CLOSE.GOING_AWAY, CLOSE.RESTARTING]) {
    const delay = retryDelay({ attempt: 3, code, hintMs: 9000, random: fixed(1) });
    assert.equal(delay, 9000 + HINT_JITTER.maxMs);
  }
  const small = retryDelay({ attempt: 3, code: CLOSE.RESTARTING, hintMs: 1000, random: fixed(1) });
  assert.equal(small, 1000 + 1000 * HINT_JITTER.fraction);
});

test("a hint's wait counts from its arrival, not from the close", () => {
  const random = fixed(0);
  const late = retryDelay({ attempt: 1, code: CLOSE.RESTARTING, hintMs: 9000, sinceHintMs: 3000, random });
  assert.equal(late, 6000);
  const over = retryDelay({ attempt: 1, code: CLOSE.RESTARTING, hintMs: 2000, sinceHintMs: 5000, random });
  assert.equal(over, 0);
  // Our own tie-breaking jitter still scales with the hint the server gave.
  const jittered = retryDelay({ attempt: 1, code: CLOSE.RESTARTING, hintMs: 9000, sinceHintMs: 9000, random: fixed(1) });
  assert.equal(jittered, HINT_JITTER.maxMs);
  const floor = retryDelay({ attempt: 2, code: CLOSE.TRY_LATER, hintMs: 3000, sinceHintMs: 1000, random });
  assert.equal(floor, 2000);
});

test("try-later and rate limits wait at least the hint", () => {
  const random = fixed(0);
  assert.equal(retryDelay({ attempt: 2, code: CLOSE.TRY_LATER, hintMs: 3000, random }), 3000);
  assert.equal(retryDelay({ attempt: 2, code: CLOSE.RATE_LIMITED, hintMs: 3000, random }), 3000);
  // A longer backoff wins over a short hint.
  const long = retryDelay({ attempt: 6, code: CLOSE.TRY_LATER, hintMs: 10, random: fixed(0.5) });
  assert.equal(long, 0.5 * ceiling(6));
});

test("a hint means nothing to other closes", () => {
  const delay = retryDelay({ attempt: 2, code: CLOSE.SERVER_ERROR, hintMs: 60000, random: fixed(0.5) });
  assert.equal(delay, 0.5 * ceiling(2));
  assert.equal(BACKOFF.spreadMs, 5000);
});
