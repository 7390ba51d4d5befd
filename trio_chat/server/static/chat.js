// The Harbourview guest chat page: plain ES modules, no build step.
//   protocol.js    close codes, the frames a guest sends, reading server frames (pure)
//   backoff.js     when to try again (pure)
//   transcript.js  the messages held and the outbox (pure)
//   connection.js  the WebSocket session: state, retries, resume
//   view.js        drawing
// This module wires them to the page.
import { Chat } from "./connection.js";
import { frames } from "./protocol.js";
import { View } from "./view.js";

const $ = (id) => document.getElementById(id);

const view = new View();
const chat = new Chat(view);
window.trioChat = chat; // for people debugging in the console, and for tests

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat.submit(view.input.value)) view.input.value = "";
  view.input.focus();
});
view.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
let typing = false;
view.input.addEventListener("input", () => {
  const active = view.input.value.trim() !== "";
  if (active !== typing && chat.send(frames.typing(active))) typing = active;
});
$("escalate").addEventListener("click", () => chat.askForPerson());
window.addEventListener("offline", () => chat.goOffline());
window.addEventListener("online", () => chat.goOnline());
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") {
    chat.checkAlive();
    chat.markRead();
  }
});

if (chat.online) chat.connect();
else chat.setState("offline");
