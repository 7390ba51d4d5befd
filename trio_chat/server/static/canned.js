// Canned replies: the hotel knowledge base's answers (GET /staff/canned.json), found by
// typing "/" and a word in the reply box. Pure (tested with node --test).

// The word after a leading "/" while staff are looking one up ("/break" -> "break"),
// or null when the reply box holds an ordinary message.
export function slashQuery(text) {
  const match = /^\/([^\s/]*)$/.exec(String(text));
  return match ? match[1].toLowerCase() : null;
}

// The replies that fit `query`, best first: a title or id starting with it, then one
// containing it, then an answer containing it. An empty query lists the first few.
export function findCanned(replies, query, limit = 6) {
  const q = String(query || "").toLowerCase();
  const scored = [];
  replies.forEach((reply, index) => {
    const title = reply.title.toLowerCase();
    const id = reply.id.toLowerCase();
    let score = null;
    if (!q) score = 3;
    else if (title.startsWith(q) || id.startsWith(q)) score = 0;
    else if (title.split(/\W+/).some((w) => w.startsWith(q)) || id.includes(q)) score = 1;
    else if (reply.text.toLowerCase().includes(q)) score = 2;
    if (score !== null) scored.push({ reply, score, index });
  });
  scored.sort((a, b) => a.score - b.score || a.index - b.index);
  return scored.slice(0, limit).map((s) => s.reply);
}

// The replies out of a canned.json body, keeping only well-formed ones.
export function parseCanned(body) {
  const replies = body && Array.isArray(body.replies) ? body.replies : [];
  return replies.filter((r) => r && typeof r.id === "string" && typeof r.title === "string"
    && typeof r.text === "string");
}
