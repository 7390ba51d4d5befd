// What the page holds: the conversation's messages in seq order with nothing missing,
// and the outbox of messages not yet acknowledged. Pure (tested with node --test).

export class Transcript {
  constructor() {
    this.held = 0; // highest seq with nothing missing below it
    this.stored = new Map(); // seq -> message
  }

  // Take a message; false when it is one we already hold.
  add(message) {
    if (this.stored.has(message.seq)) return false;
    this.stored.set(message.seq, message);
    while (this.stored.has(this.held + 1)) this.held += 1;
    return true;
  }

  // A message beyond a missing one is held: fetch history.
  get gap() {
    for (const seq of this.stored.keys()) if (seq > this.held) return true;
    return false;
  }
}

export class Outbox {
  // items: [{client_msg_id, text, sentOn}]; sentOn is the connection it went out on.
  // A staff console's items also name their conversation_id.
  constructor(items = []) {
    this.items = items;
  }

  static parse(saved) {
    try {
      const items = JSON.parse(saved || "[]");
      return new Outbox(Array.isArray(items)
        ? items.filter((m) => m && typeof m.client_msg_id === "string" && typeof m.text === "string")
          .map((m) => Outbox.item(m.client_msg_id, m.text, m.conversation_id))
        : []);
    } catch (_) {
      return new Outbox();
    }
  }

  static item(clientMsgId, text, conversationId) {
    const item = { client_msg_id: clientMsgId, text, sentOn: null };
    if (typeof conversationId === "string") item.conversation_id = conversationId;
    return item;
  }

  serialize() {
    return JSON.stringify(this.items.map(({ sentOn: _, ...saved }) => saved));
  }

  add(clientMsgId, text, conversationId) {
    const message = Outbox.item(clientMsgId, text, conversationId);
    this.items.push(message);
    return message;
  }

  find(clientMsgId) {
    return this.items.find((m) => m.client_msg_id === clientMsgId) || null;
  }

  remove(clientMsgId) {
    const found = this.find(clientMsgId);
    this.items = this.items.filter((m) => m !== found);
    return found;
  }

  // What still has to go out on `connection`, in order (each once per connection).
  due(connection) {
    return this.items.filter((m) => m.sentOn !== connection);
  }
}
