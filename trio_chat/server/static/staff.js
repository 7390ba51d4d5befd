// The Harbourview staff console (/staff): plain ES modules, no build step, sharing the
// guest page's connection, backoff, protocol and outbox modules.
//   inbox.js       the inbox: order, filters, unread counts, waiting times (pure)
//   thread.js      one conversation's messages, paged upwards (pure)
//   canned.js      canned replies found by "/" and a word (pure)
//   desk.js        the staff session on connection.js
//   staff-view.js  drawing
// This module wires them to the page: sign-in, keyboard, sound, notifications, title.
import { findCanned, parseCanned, slashQuery } from "./canned.js";
import { Desk, STAFF_TOKEN_KEY } from "./desk.js";
import { guestLabel } from "./inbox.js";
import { StaffView } from "./staff-view.js";

const $ = (id) => document.getElementById(id);
const MUTED_KEY = "trio-chat.staff-muted";
const TITLE = "Front desk · Harbourview Hotel";

// A sign-in link carries the token in the fragment (#token=…), which never reaches a
// server or a proxy's log. Keep it, then take it out of the address bar and history.
function tokenFromLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (params.has("token")) {
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (token) localStorage.setItem(STAFF_TOKEN_KEY, token.trim());
}

tokenFromLink();
const view = new StaffView();
let desk = null;

// -- never missing a guest: title, sound, desktop notification --

function renderTitle() {
  const waiting = desk ? desk.inbox.waiting : 0;
  document.title = waiting ? `(${waiting}) ${TITLE}` : TITLE;
}

let muted = localStorage.getItem(MUTED_KEY) === "1";
function renderMute() {
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Sound off" : "Sound on";
}

let audio = null;
function chime() {
  if (muted) return;
  window.trioChimes = (window.trioChimes || 0) + 1; // for tests
  try {
    audio = audio || new AudioContext();
    const now = audio.currentTime;
    for (const [offset, pitch] of [[0, 880], [0.18, 1320]]) {
      const tone = audio.createOscillator();
      const gain = audio.createGain();
      tone.frequency.value = pitch;
      gain.gain.setValueAtTime(0.0001, now + offset);
      gain.gain.exponentialRampToValueAtTime(0.2, now + offset + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, now + offset + 0.35);
      tone.connect(gain).connect(audio.destination);
      tone.start(now + offset);
      tone.stop(now + offset + 0.4);
    }
  } catch (_) { /* no audio here: the title and the notification still tell */ }
}

function renderAlertsButton() {
  const button = $("alerts");
  const supported = typeof Notification !== "undefined";
  button.hidden = !supported || Notification.permission === "granted";
  button.disabled = supported && Notification.permission === "denied";
}

function notify(entry) {
  chime();
  if (document.visibilityState !== "hidden") return;
  if (typeof Notification === "undefined" || Notification.permission !== "granted") return;
  const note = new Notification(`${guestLabel(entry)} is waiting`, {
    body: entry.preview || "A guest asked for a person.",
    tag: entry.conversation_id,
  });
  note.onclick = () => {
    window.focus();
    view.open(entry.conversation_id);
  };
}

view.onAlert = notify;
view.onInboxChange = renderTitle;

// -- canned replies --

let canned = [];
let cannedShown = [];
let cannedIndex = 0;
fetch("/staff/canned.json").then((r) => (r.ok ? r.json() : null))
  .then((body) => { canned = parseCanned(body); })
  .catch(() => { canned = []; });

function updateCanned() {
  const query = slashQuery(view.input.value);
  cannedShown = query === null ? [] : findCanned(canned, query);
  cannedIndex = 0;
  if (cannedShown.length) view.showCanned(cannedShown, cannedIndex);
  else view.hideCanned();
}

view.onPickCanned = (reply) => {
  view.input.value = reply.text; // for editing before sending
  view.hideCanned();
  cannedShown = [];
  view.input.focus();
  view.input.setSelectionRange(reply.text.length, reply.text.length);
  desk.typed(view.input.value);
};

// -- signing in and out --

function start(token) {
  desk = new Desk(view, token);
  view.desk = desk;
  window.trioDesk = desk; // for people debugging in the console, and for tests
  $("signin").hidden = true;
  $("desk").hidden = false;
  view.renderInbox();
  view.renderConversation();
  if (desk.online) desk.connect();
  else desk.setState("offline");
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  $("token").value = "";
  localStorage.setItem(STAFF_TOKEN_KEY, token);
  $("signin-message").hidden = true;
  start(token);
});

$("signout").addEventListener("click", () => {
  desk.signOut();
  view.signedOut("Signed out. Open your sign-in link to come back.");
  renderTitle();
});

// -- the controls --

$("mute").addEventListener("click", () => {
  muted = !muted;
  localStorage.setItem(MUTED_KEY, muted ? "1" : "0");
  renderMute();
});
$("alerts").addEventListener("click", () => {
  Notification.requestPermission().then(renderAlertsButton, renderAlertsButton);
});
$("claim").addEventListener("click", () => desk.claim());
$("release").addEventListener("click", () => desk.release());
$("resolve").addEventListener("click", () => desk.resolve());
$("watch").addEventListener("click", () => desk.toggleWatch());
$("back").addEventListener("click", () => view.back());

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (desk.reply(view.input.value)) view.input.value = "";
  view.hideCanned();
  view.input.focus();
});

view.input.addEventListener("input", () => {
  updateCanned();
  desk.typed(view.input.value);
});

view.input.addEventListener("keydown", (event) => {
  if (cannedShown.length) {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      cannedIndex = (cannedIndex + step + cannedShown.length) % cannedShown.length;
      view.showCanned(cannedShown, cannedIndex);
      return;
    }
    if (event.key === "Enter" || event.key === "Tab") {
      event.preventDefault();
      view.onPickCanned(cannedShown[cannedIndex]);
      return;
    }
    if (event.key === "Escape") {
      event.preventDefault();
      view.hideCanned();
      cannedShown = [];
      return;
    }
  }
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  } else if (event.key === "Escape") {
    event.preventDefault();
    view.back();
  }
});

// The inbox list: arrows move, Enter opens (roving tabindex, one tab stop).
view.list.addEventListener("keydown", (event) => {
  const moves = { ArrowDown: 1, ArrowUp: -1, Home: -Infinity, End: Infinity };
  if (event.key in moves) {
    event.preventDefault();
    view.moveSelection(moves[event.key]);
  } else if ((event.key === "Enter" || event.key === " ") && view.selected) {
    event.preventDefault();
    view.open(view.selected);
  }
});
$("filters").addEventListener("keydown", (event) => {
  if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
  const tabs = [...$("filters").children];
  const index = tabs.findIndex((t) => t.dataset.filter === view.filter);
  const next = tabs[(index + (event.key === "ArrowRight" ? 1 : -1) + tabs.length) % tabs.length];
  view.setFilter(next.dataset.filter);
  next.focus();
});

// Shortcuts that work from anywhere: Alt and a letter (by key position, so they also
// work on keyboards where Alt types other characters).
const SHORTCUTS = {
  KeyC: () => desk.claim(),
  KeyL: () => desk.release(),
  KeyR: () => desk.resolve(),
  KeyW: () => desk.toggleWatch(),
  KeyI: () => { if (!view.list.children.length) $(`filter-${view.filter}`).focus(); else view.focusSelected(); },
  KeyM: () => $("mute").click(),
};
document.addEventListener("keydown", (event) => {
  if (!desk || !event.altKey || event.ctrlKey || event.metaKey) return;
  const run = SHORTCUTS[event.code];
  if (run) {
    event.preventDefault();
    run();
  }
});

// Scrolling back loads the page above.
view.log.addEventListener("scroll", () => {
  if (view.log.scrollTop < 60) desk.loadOlder();
});

setInterval(() => view.tick(), 1000);
window.addEventListener("offline", () => desk && desk.goOffline());
window.addEventListener("online", () => desk && desk.goOnline());
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && desk) {
    desk.checkAlive();
    desk.markRead();
  }
});

renderMute();
renderAlertsButton();
renderTitle();
const token = localStorage.getItem(STAFF_TOKEN_KEY);
if (token) start(token);
else {
  $("desk").hidden = true;
  $("signin").hidden = false;
}
