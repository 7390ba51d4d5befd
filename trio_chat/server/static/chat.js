// The Harbourview guest chat page: plain ES modules, no build step.
//   protocol.js    close codes, the frames a client sends, reading server frames (pure)
//   backoff.js     when to try again (pure)
//   transcript.js  the messages held and the outbox (pure)
//   connection.js  the WebSocket connection: state, retries, resume (shared with /staff)
//   guest.js       the guest's session on it
//   view.js        drawing
// This module wires them to the page.
import { Chat } from "./guest.js";
import { frames } from "./protocol.js";
import { View } from "./view.js";

const $ = (id) => document.getElementById(id);

const INTRO_KEY = "trio-chat.introduced";

// The hotel's link may say who the guest is (/?name=Maria%20Lopez&room=412): take it,
// then drop it from the address bar (and so from bookmarks and shared screenshots).
function whoFromLink() {
  const params = new URLSearchParams(location.search);
  const who = { name: params.get("name") || "", room: params.get("room") || "" };
  if (!params.has("name") && !params.has("room")) return null;
  params.delete("name");
  params.delete("room");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  return who;
}

const fromLink = whoFromLink();
if (fromLink) localStorage.setItem(INTRO_KEY, "1");
const view = new View();
const chat = new Chat(view, fromLink || {});
window.trioChat = chat; // for people debugging in the console, and for tests

// Asked once, never in the way: a new guest may say who they are, or just write.
const intro = $("intro");
intro.hidden = Boolean(chat.token || localStorage.getItem(INTRO_KEY));
function closeIntro() {
  localStorage.setItem(INTRO_KEY, "1");
  intro.hidden = true;
}
intro.addEventListener("submit", (event) => {
  event.preventDefault();
  closeIntro();
  chat.introduce({ name: $("intro-name").value, room: $("intro-room").value });
  view.input.focus();
});
$("intro-skip").addEventListener("click", () => { closeIntro(); view.input.focus(); });

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat.submit(view.input.value)) {
    view.input.value = "";
    setTyping(false); // clearing the box fires no input event
    if (!intro.hidden) closeIntro(); // writing first is a choice too
  }
  view.input.focus();
});
view.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
let typing = false;
function setTyping(active) {
  if (active !== typing && chat.send(frames.typing(active))) typing = active;
}
view.input.addEventListener("input", () => setTyping(view.input.value.trim() !== ""));
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
