// Canned replies: "/" and a word finds the knowledge base's answers.
import assert from "node:assert/strict";
import { test } from "node:test";

import { findCanned, parseCanned, slashQuery } from "../../trio_chat/server/static/canned.js";

const replies = [
  { id: "breakfast", title: "Breakfast", text: "Breakfast is served 6:30-10:30 in the Harbour Room." },
  { id: "checkout", title: "Check-out time", text: "Check-out is at 11:00." },
  { id: "late_checkout", title: "Late check-out", text: "Late check-out until 14:00 costs 30 EUR." },
  { id: "parking", title: "Parking", text: "The garage is open day and night; breakfast guests park free." },
];

test("only a leading slash and one word is a lookup", () => {
  assert.equal(slashQuery("/"), "");
  assert.equal(slashQuery("/Break"), "break");
  assert.equal(slashQuery("/break fast"), null);
  assert.equal(slashQuery("hello /break"), null);
  assert.equal(slashQuery("//"), null);
  assert.equal(slashQuery(""), null);
});

test("titles and ids that start with the word come first, answers that mention it last", () => {
  assert.deepEqual(findCanned(replies, "break").map((r) => r.id), ["breakfast", "parking"]);
  assert.deepEqual(findCanned(replies, "check").map((r) => r.id), ["checkout", "late_checkout"]);
  assert.deepEqual(findCanned(replies, "").map((r) => r.id), replies.map((r) => r.id));
  assert.deepEqual(findCanned(replies, "", 2).length, 2);
  assert.deepEqual(findCanned(replies, "spa"), []);
});

test("a canned.json body keeps only well-formed replies", () => {
  assert.deepEqual(parseCanned(null), []);
  assert.deepEqual(parseCanned({ replies: "no" }), []);
  assert.deepEqual(parseCanned({ replies: [replies[0], { id: 1 }, null] }), [replies[0]]);
});
