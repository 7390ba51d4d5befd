// When to try again: exponential backoff with full jitter, the first retry after a
// healthy connection spread wide, and the server's hints honoured. Pure: the random
// source is a parameter (tested with node --test; the page passes Math.random).
import { CLOSE } from "./protocol.js";

// spreadMs: the first retry after losing a healthy connection is uniform in
// [0, spreadMs]. A crash drops every guest at once; without it their first retries
// would all fall within half a second (the Python client does the same).
export const BACKOFF = Object.freeze({ initialMs: 500, factor: 2, maxMs: 30000, spreadMs: 5000 });
// The server already spreads its hints; ours only breaks ties.
export const HINT_JITTER = Object.freeze({ fraction: 0.2, maxMs: 500 });

// The longest wait before attempt number `attempt` (1 is the first retry).
export function ceiling(attempt, policy = BACKOFF) {
  return Math.min(policy.maxMs, policy.initialMs * policy.factor ** Math.max(0, attempt - 1));
}

// Milliseconds to wait before the next attempt, after a close with `code`.
// `hintMs`: the server's reconnect.after_ms or retry_after_ms, or null; `sinceHintMs`:
// how long ago it arrived. The wait counts from the hint, not from the close: a server
// draining thousands of connections may close this one seconds after it sent the hint.
export function retryDelay({
  attempt,
  code,
  hintMs = null,
  sinceHintMs = 0,
  random = Math.random,
  policy = BACKOFF,
}) {
  const first = attempt <= 1;
  let delay = random() * (first ? policy.spreadMs : ceiling(attempt, policy)); // full jitter
  if (hintMs !== null && hintMs !== undefined) {
    const remaining = Math.max(0, hintMs - sinceHintMs);
    const hinted = remaining + random() * Math.min(hintMs * HINT_JITTER.fraction, HINT_JITTER.maxMs);
    if (code === CLOSE.GOING_AWAY || code === CLOSE.RESTARTING) delay = hinted;
    else if (code === CLOSE.TRY_LATER || code === CLOSE.RATE_LIMITED) delay = Math.max(delay, hinted);
  }
  return delay;
}
