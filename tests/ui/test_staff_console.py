"""The staff console (/staff), end to end in real headless Chromium against the real
server: guest pages and consoles in separate browser contexts (separate storage, like
separate machines), under the Content-Security-Policy the server is about to send.

One server and one browser serve the module; the restart-and-removal scenario has its
own server. Screenshots land in test-artifacts/staff/, or in $TRIO_CHAT_SCREENSHOTS
(``TRIO_CHAT_SCREENSHOTS=docs/images`` refreshes the ones the docs show).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ..helpers import connect, free_port, server_process, staff_token
from .test_page import CHROMIUM, sync_api

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "staff"
CSP = "default-src 'self'; frame-ancestors 'none'"

# Every CSP violation, and every state the status element passes through.
WATCH_PAGE = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
window.__states = [];
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  window.__states.push(status.dataset.state);
  new MutationObserver(() => {
    const s = status.dataset.state;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(status, {attributes: true, attributeFilter: ["data-state"]});
});
"""

# A desktop notification API that records instead of showing, with permission granted,
# and a page that can be told it is hidden (headless pages are always visible).
STUB_NOTIFICATIONS = """
window.__notes = [];
window.Notification = class {
  constructor(title, options) { window.__notes.push({title, ...options}); }
  static get permission() { return "granted"; }
  static requestPermission() { return Promise.resolve("granted"); }
};
Object.defineProperty(document, "visibilityState",
  {get: () => (window.__hidden ? "hidden" : "visible")});
Object.defineProperty(document, "hidden", {get: () => Boolean(window.__hidden)});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-sync",
                # A document the test fulfils (to add the CSP header) has no address
                # space of its own, and Chromium's local-network checks would then
                # refuse its WebSocket to 127.0.0.1. Real pages come from the server.
                "--disable-features=LocalNetworkAccessChecks",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """One server for the scenarios that do not stop it: each uses its own guests and
    staff names."""
    db = tmp_path_factory.mktemp("staff") / "chat.db"
    port = free_port()
    with server_process(db, port):
        yield db, port


@pytest.fixture
def contexts(browser: Any) -> Iterator[Any]:
    """New browser contexts whose pages get the server's CSP; at the end, no page may
    have violated it. (Wait with function predicates: a string one is eval'd in the
    page, which the policy rightly refuses.)"""
    opened: list[Any] = []

    def new_context(*, width: int = 1200, height: int = 760, **options: Any) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height}, **options)
        context.add_init_script(WATCH_PAGE)

        # The policy the server is about to send with its pages: no inline script or
        # style, nothing from elsewhere. (Documents only; a second header is harmless.)
        def with_csp(route: Any) -> None:
            response = route.fetch()
            headers = {**response.headers, "content-security-policy": CSP}
            route.fulfill(response=response, headers=headers)

        context.route(re.compile(r"^http://127\.0\.0\.1:\d+/(staff|\?.*)?$"), with_csp)
        opened.append(context)
        return context

    yield new_context
    for context in opened:
        assert context.pages == [] or all(
            page.evaluate("window.__csp") == [] for page in context.pages
        ), [page.evaluate("window.__csp") for page in context.pages]
        context.close()


def shot(page: Any, name: str) -> None:
    folder = Path(os.environ.get("TRIO_CHAT_SCREENSHOTS") or ARTIFACTS)
    if not folder.is_absolute():
        folder = ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


def console(new_context: Any, port: int, token: str, **options: Any) -> Any:
    """A staff console opened from its sign-in link, connected."""
    page = new_context(**options).new_page()
    page.goto(f"http://127.0.0.1:{port}/staff#token={token}")
    wait_state(page, "connected")
    return page


def wait_state(page: Any, state: str, timeout: float = 15_000) -> None:
    page.wait_for_selector(f'#status[data-state="{state}"]', timeout=timeout)


def row(page: Any, label: str) -> str:
    return f'#inbox .row:has(.guest:text-is("{label}"))'


def guest_escalates(port: int, name: str, room: str, text: str) -> str:
    """A guest (Python, raw protocol) writes and asks for a person; returns their token."""

    async def run() -> str:
        with trio.fail_after(15):
            async with connect(port) as guest:
                welcome = await guest.hello(None, name=name, room=room)
                await guest.send(type="message", client_msg_id="m1", text=text)
                await guest.expect("ack")
                await guest.send(type="escalate")
                await guest.expect("status", status="waiting")
                token: str = welcome["token"]
                return token

    return trio.run(run)


def guest_says(port: int, token: str, text: str, client_msg_id: str) -> None:
    async def run() -> None:
        with trio.fail_after(15):
            async with connect(port) as guest:
                await guest.hello(token)
                await guest.send(type="message", client_msg_id=client_msg_id, text=text)
                await guest.expect("ack")

    trio.run(run)


# --------------------------------------------------------------------- the whole flow


def test_a_hand_off_from_escalation_to_resolve_at_the_keyboard(
    shared: tuple[Path, int], contexts: Any
) -> None:
    db, port = shared
    anna = console(contexts, port, staff_token(db, "Anna Berg"))
    # The link's token is kept and gone from the address bar.
    assert anna.url == f"http://127.0.0.1:{port}/staff"
    assert anna.evaluate("localStorage.getItem('trio-chat.staff-token')").startswith("s.")
    assert anna.inner_text("#duty").strip() == "Anna Berg (you)"

    guest = contexts(width=420, height=760).new_page()
    guest.goto(f"http://127.0.0.1:{port}/?name=Maria%20Lopez&room=412&lang=en")
    wait_state(guest, "connected")
    assert guest.url == f"http://127.0.0.1:{port}/?lang=en"  # name and room dropped
    assert guest.is_hidden("#intro")  # the link said who she is: nothing to ask
    guest.fill("#input", "The shower in my room is cold")
    guest.press("#input", "Enter")
    guest.wait_for_selector('#messages > li[data-sender="ai"]')

    # She asks for a person: the inbox has her, by name and room, within a second.
    started = time.monotonic()
    guest.click("#escalate")
    anna.wait_for_selector(f'{row(anna, "Maria Lopez · 412")}[data-status="waiting"]')
    assert time.monotonic() - started < 1.0
    waiting = anna.inner_text(row(anna, "Maria Lopez · 412"))
    assert "waiting 0 s" in waiting and "talk to a person" in waiting  # the last message
    assert anna.title().startswith("(1) ")
    shot(anna, "staff-inbox")

    # Keyboard only from here: Alt+I to the inbox, Enter opens, Alt+C claims.
    anna.keyboard.press("Alt+KeyI")
    assert anna.evaluate("document.activeElement.classList.contains('row')")
    anna.keyboard.press("Enter")
    anna.wait_for_selector('#messages .msg[data-sender="guest"]:has-text("shower")')
    assert anna.evaluate("document.activeElement.id") == "input"
    assert anna.inner_text("#guest") == "Maria Lopez · 412"
    anna.keyboard.press("Alt+KeyC")
    anna.wait_for_selector('#conv-status:text-is("With you")')
    guest.wait_for_selector('#messages > li[data-sender="system"]:has-text("Anna Berg")')
    assert anna.title() == "Front desk · Harbourview Hotel"  # nobody waits now

    # Typing both ways.
    anna.keyboard.type("Hi Maria, Anna at reception here.")
    guest.wait_for_selector('#typing:has-text("Anna Berg is typing")')
    guest.type("#input", "Thank")
    anna.wait_for_selector('#typing:has-text("Maria Lopez is typing")')
    anna.keyboard.press("Enter")
    guest.wait_for_selector('#messages > li[data-sender="staff"]:has-text("Anna at reception")')
    assert guest.is_hidden("#typing")
    guest.press("#input", "End")
    guest.type("#input", "s, it is still cold")
    guest.press("#input", "Enter")
    anna.wait_for_selector('#messages .msg[data-sender="guest"]:has-text("still cold")')
    anna.wait_for_selector("#typing", state="hidden")

    # Read marks: the guest's page is visible, so she has read Anna's reply.
    anna.wait_for_selector(".read-mark")
    read_seq = anna.evaluate("window.trioDesk.thread(window.trioDesk.openId).guestReadSeq")
    reply_seq = int(anna.get_attribute('#messages .msg[data-sender="staff"][data-seq]', "data-seq"))
    assert read_seq >= reply_seq
    # ... and Anna's console marked the guest's messages read for the guest page.
    guest.wait_for_selector('#messages > li[data-sender="guest"][data-read="true"]')

    # A canned reply: "/" and a word, Enter inserts it for editing, Enter sends.
    anna.keyboard.type("/break")
    anna.wait_for_selector('#canned:not([hidden]) .canned-option:has-text("Breakfast")')
    anna.keyboard.press("Enter")
    draft = anna.input_value("#input")
    assert draft.startswith("Breakfast") and not anna.is_visible("#canned")
    anna.keyboard.press("Enter")
    guest.wait_for_selector(f'#messages > li[data-sender="staff"]:has-text("{draft[:30]}")')
    shot(anna, "staff-conversation")

    # Alt+R resolves; the guest reads the system message.
    anna.keyboard.press("Alt+KeyR")
    guest.wait_for_selector('#messages > li[data-sender="system"]:has-text("marked this")')
    anna.wait_for_selector('#conv-status:text-is("Resolved")')
    anna.click("#filter-resolved")
    assert anna.is_visible(row(anna, "Maria Lopez · 412"))
    # Every message once, in order, on both sides.
    staff_seqs = anna.eval_on_selector_all(
        "#messages .msg[data-seq]", "l => l.map(i => Number(i.dataset.seq))"
    )
    assert staff_seqs == list(range(1, len(staff_seqs) + 1))
    guest_seqs = guest.eval_on_selector_all(
        "#messages > li[data-seq]", "l => l.map(i => Number(i.dataset.seq))"
    )
    assert guest_seqs == staff_seqs


def test_a_guest_asked_once_for_name_and_room_reaches_staff_with_them(
    shared: tuple[Path, int], contexts: Any
) -> None:
    db, port = shared
    bea = console(contexts, port, staff_token(db, "Bea"))
    guest = contexts(width=420, height=760).new_page()
    guest.goto(f"http://127.0.0.1:{port}/")
    wait_state(guest, "connected")
    guest.wait_for_selector("#intro:not([hidden])")
    shot(guest, "guest-intro")
    guest.fill("#intro-name", "Olu Ade")
    guest.fill("#intro-room", "27")
    guest.press("#intro-room", "Enter")
    wait_state(guest, "connected")
    assert guest.is_hidden("#intro")
    guest.fill("#input", "I want to talk to a person please")
    guest.press("#input", "Enter")
    bea.wait_for_selector(f'{row(bea, "Olu Ade · 27")}[data-status="waiting"]')
    guest.reload()  # asked once: never again
    wait_state(guest, "connected")
    assert guest.is_hidden("#intro")


def test_two_consoles_race_to_claim_and_the_loser_is_told_who_won(
    shared: tuple[Path, int], contexts: Any
) -> None:
    db, port = shared
    ben = console(contexts, port, staff_token(db, "Ben"))
    cleo = console(contexts, port, staff_token(db, "Cleo"), width=820, height=1000)
    assert "Ben" in cleo.inner_text("#duty") and "Cleo (you)" in cleo.inner_text("#duty")
    ben.wait_for_selector('#duty li:text-is("Cleo")')
    guest_escalates(port, "Race Guest", "9", "Nobody answers the phone at reception")
    for page in (ben, cleo):
        page.click(row(page, "Race Guest · 9"))
        page.wait_for_selector('#messages .msg[data-sender="guest"]')
    # Both press Claim before either hears the outcome.
    ben.evaluate("window.trioDesk.claim()")
    cleo.evaluate("window.trioDesk.claim()")
    for page in (ben, cleo):
        page.wait_for_selector('#conv-status:text-matches("^With (you|Ben|Cleo)$")')
    holders = {p: p.inner_text("#conv-status") for p in (ben, cleo)}
    assert sorted(holders.values())[1] == "With you" or "With you" in holders.values()
    winner, loser = (ben, cleo) if holders[ben] == "With you" else (cleo, ben)
    notice = loser.wait_for_selector("#conv-notice:not([hidden])")
    assert notice is not None
    winner_name = "Ben" if winner is ben else "Cleo"
    assert notice.inner_text() == (
        f"{winner_name} claimed this conversation first. It is theirs now; you can still watch."
    )
    assert "conflict" not in notice.inner_text()
    assert winner.is_hidden("#conv-notice")
    assert loser.is_disabled("#claim") and loser.is_disabled("#send")
    shot(loser, "staff-conflict")


def test_a_conflict_arriving_after_the_winner_s_status_is_still_told_in_place(
    shared: tuple[Path, int], contexts: Any
) -> None:
    # The race's other order, made certain: the loser's console hears the winner's
    # status before its own claim's conflict (it was once filed under no conversation).
    db, port = shared
    kai = console(contexts, port, staff_token(db, "Kai"))
    lea = console(contexts, port, staff_token(db, "Lea"))
    guest_escalates(port, "Order Guest", "5", "Is anyone at the desk?")
    for page in (kai, lea):
        page.click(row(page, "Order Guest · 5"))
        page.wait_for_selector('#messages .msg[data-sender="guest"]')
    lea.evaluate("""() => { const d = window.trioDesk; d.held = [];
        d.receiveNow = d.receive; d.receive = (c, raw) => d.held.push([c, raw]); }""")
    kai.evaluate("window.trioDesk.claim()")
    kai.wait_for_selector('#conv-status:text-is("With you")')
    lea.evaluate("window.trioDesk.claim()")
    lea.wait_for_function(
        "() => window.trioDesk.held.some(([, raw]) => raw.includes('\"conflict\"'))"
    )
    order = lea.evaluate("window.trioDesk.held.map(([, raw]) => JSON.parse(raw).type)")
    assert order.index("status") < order.index("error")
    lea.evaluate("""() => { const d = window.trioDesk; d.receive = d.receiveNow;
        for (const [c, raw] of d.held) d.receive(c, raw); }""")
    notice = lea.wait_for_selector("#conv-notice:not([hidden])")
    assert notice is not None and notice.inner_text().startswith("Kai claimed this conversation")
    assert lea.is_hidden("#notice")


def test_a_guest_who_starts_waiting_while_the_console_is_hidden_is_announced(
    shared: tuple[Path, int], contexts: Any
) -> None:
    db, port = shared
    context = contexts(permissions=["notifications"])
    context.add_init_script(STUB_NOTIFICATIONS)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port}/staff#token={staff_token(db, 'Dana')}")
    wait_state(page, "connected")
    assert page.is_hidden("#alerts")  # permission already granted: nothing to ask
    before = page.evaluate("window.trioDesk.inbox.waiting")
    page.evaluate("window.__hidden = true; document.dispatchEvent(new Event('visibilitychange'))")

    guest_escalates(port, "Chris Doe", "7", "My key card stopped working")
    page.wait_for_function("() => window.__notes.length === 1")
    [note] = page.evaluate("window.__notes")
    assert note["title"] == "Chris Doe · 7 is waiting"
    assert note["tag"].startswith("c_")
    assert page.title() == f"({before + 1}) Front desk · Harbourview Hotel"
    assert page.evaluate("window.trioChimes") == 1

    # Muted (and remembered): no sound, but the notification still comes.
    page.click("#mute")
    assert page.get_attribute("#mute", "aria-pressed") == "true"
    guest_escalates(port, "Eve Sun", "8", "I need a person")
    page.wait_for_function("() => window.__notes.length === 2")
    assert page.evaluate("window.trioChimes") == 1
    assert page.title() == f"({before + 2}) Front desk · Harbourview Hotel"
    page.reload()
    wait_state(page, "connected")
    assert page.get_attribute("#mute", "aria-pressed") == "true"
    assert page.evaluate("window.__notes") == []  # the inbox as found is not news

    # While visible, a new wait makes no notification (the list shows it).
    page.evaluate("window.__hidden = false")
    page.click("#mute")
    guest_escalates(port, "Finn Roe", "10", "Please call me")
    page.wait_for_selector(row(page, "Finn Roe · 10"))
    assert page.evaluate("window.__notes") == [] and page.evaluate("window.trioChimes") == 1


# ---------------------------------------------------- restart, removal, sign-out


def test_the_console_survives_a_restart_and_a_removed_member_is_signed_out(
    tmp_path: Path, contexts: Any
) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    with server_process(db, port) as server:
        gus = console(contexts, port, staff_token(db, "Gus"))
        token = guest_escalates(port, "Hana Ito", "301", "The heating does not work")
        gus.click(row(gus, "Hana Ito · 301"))
        gus.click("#claim")
        gus.wait_for_selector('#conv-status:text-is("With you")')
        server.send_signal(signal.SIGINT)  # graceful: reconnect hint, then 1012
        server.wait(timeout=15)
    wait_state(gus, "reconnecting")
    assert "Reconnecting" in gus.inner_text("#status")
    with server_process(db, port) as server:
        # Written while the console may still be away: it must arrive, once.
        guest_says(port, token, "Hello? Anyone there?", "m2")
        wait_state(gus, "connected", timeout=30_000)
        gus.wait_for_selector('#messages .msg[data-sender="guest"]:has-text("Anyone there")')
        guest_says(port, token, "Still cold in here.", "m3")
        gus.wait_for_selector('#messages .msg[data-sender="guest"]:has-text("Still cold")')
        texts = gus.eval_on_selector_all("#messages .msg .body", "l => l.map(i => i.textContent)")
        assert texts.count("Hello? Anyone there?") == 1
        seqs = gus.eval_on_selector_all(
            "#messages .msg[data-seq]", "l => l.map(i => Number(i.dataset.seq))"
        )
        assert seqs == list(range(1, len(seqs) + 1))
        assert gus.inner_text("#conv-status") == "With you"  # still held, still live
        assert gus.evaluate("window.__states")[:2] == ["connecting", "connected"]
        assert "reconnecting" in gus.evaluate("window.__states")

        # Removed while the console is open: the running server notices the removal
        # made by another process, closes the console (4401) and gives the
        # conversation back to the queue; the page says why and never retries.
        removed = subprocess.run(
            [sys.executable, "-m", "trio_chat", "staff", "remove", "Gus", "--db", str(db)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert removed.returncode == 0, removed.stderr
        gus.wait_for_selector("#signin:not([hidden])", timeout=5_000)
        assert gus.inner_text("#signin-message") == ("Signed out: this staff member was removed.")
        shot(gus, "staff-signed-out")
        assert gus.evaluate("window.trioDesk.stopped") is True
        assert gus.evaluate("window.trioDesk.retryTimer") is None  # no retry, ever
        assert gus.evaluate("localStorage.getItem('trio-chat.staff-token')") is None
        assert gus.get_attribute("#status", "data-state") == "closed"


def test_signing_out_forgets_the_token_and_closes_the_connection(
    shared: tuple[Path, int], contexts: Any
) -> None:
    db, port = shared
    ivy = console(contexts, port, staff_token(db, "Ivy"))
    watcher = console(contexts, port, staff_token(db, "Jon"))
    watcher.wait_for_selector('#duty li:text-is("Ivy")')
    ivy.click("#signout")
    ivy.wait_for_selector("#signin:not([hidden])")
    assert "Signed out" in ivy.inner_text("#signin-message")
    assert ivy.evaluate("localStorage.getItem('trio-chat.staff-token')") is None
    watcher.wait_for_selector('#duty li:text-is("Ivy")', state="detached")
    ivy.reload()
    assert ivy.is_visible("#signin") and ivy.is_hidden("#desk")
    health = json.loads(watcher.evaluate("fetch('/healthz').then(r => r.text())"))
    assert health["staff_online"] >= 1
