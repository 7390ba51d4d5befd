// Protocol v1 for the browser: close codes by name, the frames guests and staff send, and
// reading the frames the server sends. Pure: no DOM, no socket (tested with node --test).

export const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  SERVER_ERROR: 1011,
  RESTARTING: 1012,
  TRY_LATER: 1013,
  AUTH_FAILED: 4401,
  HELLO_TIMEOUT: 4408,
  RATE_LIMITED: 4429,
});

export const MAX_TEXT = 4000;
export const MAX_CLIENT_MSG_ID = 64;
export const HISTORY_PAGE = 500;

export const MAX_NAME = 80;
export const MAX_ROOM = 20;

// The frames a guest sends, built in one place. `who` ({name, room}, both optional)
// goes with a new guest's hello (room is an extension: old servers ignore it).
export const frames = Object.freeze({
  hello: (token, who = {}) => {
    const frame = { type: "hello", token: token ?? null };
    const name = String(who.name ?? "").trim().slice(0, MAX_NAME);
    const room = String(who.room ?? "").trim().slice(0, MAX_ROOM);
    if (name) frame.name = name;
    if (room) frame.room = room;
    return frame;
  },
  message: (clientMsgId, text) => ({ type: "message", client_msg_id: clientMsgId, text }),
  history: (afterSeq) => ({ type: "history", after_seq: afterSeq, limit: HISTORY_PAGE }),
  escalate: (reason) => (reason ? { type: "escalate", reason } : { type: "escalate" }),
  typing: (active) => ({ type: "typing", active: Boolean(active) }),
  read: (seq) => ({ type: "read", seq }),
  ping: (id) => ({ type: "ping", id }),
});

// The frames a staff console sends: the same, naming the conversation, and the
// staff actions (claim, release, resolve, watch, unwatch).
export const staffFrames = Object.freeze({
  message: (conversationId, clientMsgId, text) =>
    ({ type: "message", conversation_id: conversationId, client_msg_id: clientMsgId, text }),
  history: (conversationId, afterSeq, limit = HISTORY_PAGE) =>
    ({ type: "history", conversation_id: conversationId, after_seq: afterSeq, limit }),
  typing: (conversationId, active) =>
    ({ type: "typing", conversation_id: conversationId, active: Boolean(active) }),
  read: (conversationId, seq) => ({ type: "read", conversation_id: conversationId, seq }),
  action: (action, conversationId) => ({ type: action, conversation_id: conversationId }),
});

// A server frame as an object, or null when it is not one of ours (not JSON, not an
// object, no string type): clients ignore what they do not understand.
export function parseFrame(raw) {
  let frame;
  try {
    frame = JSON.parse(raw);
  } catch (_) {
    return null;
  }
  if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return null;
  return typeof frame.type === "string" ? frame : null;
}

// What a guest typed, as it will be stored: trimmed; or why it cannot be sent.
export function checkText(text) {
  const trimmed = String(text).trim();
  if (!trimmed) return { error: "empty" };
  if (trimmed.length > MAX_TEXT) return { error: `Messages can be at most ${MAX_TEXT} characters.` };
  return { text: trimmed };
}

// A client_msg_id: unique, in the protocol's alphabet, at most 64 characters.
export function newClientMsgId(uuid = globalThis.crypto?.randomUUID?.bind(globalThis.crypto)) {
  const random = (uuid && uuid())
    || `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  return `w-${random}`.replace(/[^A-Za-z0-9._-]/g, "").slice(0, MAX_CLIENT_MSG_ID);
}
