"""The guest chat page, end to end in real headless Chromium against the real server.

Chromium is Debian's package (`.ci/run` installs it) driven by Playwright with
`executable_path`; where it is missing the tests skip, except under CI=true where that
is a failure. Screenshots of each state land in test-artifacts/page/.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_chat import StaffClient

from ..browser import launch, require_chromium
from ..helpers import free_port, server_process, staff_token

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "page"

require_chromium(module=True)

sync_api = pytest.importorskip("playwright.sync_api")

# Record every state the status element passes through, so a test can prove the page
# went through "reconnecting" even if it was brief.
RECORD_STATES = """
window.__states = [];
new MutationObserver(() => {}).observe(document, {childList: true});
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  window.__states.push(status.dataset.state);
  new MutationObserver(() => {
    const s = status.dataset.state;
    if (window.__states[window.__states.length - 1] !== s) window.__states.push(s);
  }).observe(status, {attributes: true, attributeFilter: ["data-state"]});
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page_for(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def open_page(port: int, width: int = 420, height: int = 760) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.add_init_script(RECORD_STATES)
        contexts.append(context)
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        return page

    yield open_page
    for context in contexts:
        context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_state(page: Any, state: str, timeout: float = 15_000) -> None:
    page.wait_for_selector(f'#status[data-state="{state}"]', timeout=timeout)


def say(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def stored_messages(page: Any) -> list[dict[str, str]]:
    items: list[dict[str, str]] = page.eval_on_selector_all(
        "#messages > li",
        "items => items.map(i => ({seq: i.dataset.seq || '', sender: i.dataset.sender, "
        "text: i.querySelector('.body').textContent}))",
    )
    return items


def test_first_visit_gets_an_answer_and_a_reload_keeps_the_guest(
    tmp_path: Path, page_for: Any
) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        page = page_for(port)
        wait_state(page, "connected")
        assert page.inner_text("#status").strip() == "Connected"
        assert page.eval_on_selector_all("#messages > li", "l => l.length") == 0
        shot(page, "01-connected-empty")
        say(page, "What time is breakfast?")
        page.wait_for_selector('#messages > li[data-sender="ai"]')
        page.wait_for_selector('#messages > li[data-sender="guest"][data-seq="1"]')
        shot(page, "02-concierge-answered")
        before = stored_messages(page)
        assert [(m["seq"], m["sender"]) for m in before] == [("1", "guest"), ("2", "ai")]
        assert "Breakfast" in before[1]["text"]
        token = page.evaluate("localStorage.getItem('trio-chat.token')")
        assert token and token.startswith("g.")
        assert page.evaluate("window.__states")[:2] == ["connecting", "connected"]

        page.reload()
        wait_state(page, "connected")
        page.wait_for_selector('#messages > li[data-seq="2"]')
        assert stored_messages(page) == before
        assert page.evaluate("localStorage.getItem('trio-chat.token')") == token


def test_a_server_restart_is_recovered_by_the_page_itself(tmp_path: Path, page_for: Any) -> None:
    port = free_port()
    db = tmp_path / "chat.db"
    with server_process(db, port) as server:
        page = page_for(port)
        wait_state(page, "connected")
        say(page, "Is there parking?")
        page.wait_for_selector('#messages > li[data-seq="2"]')
        server.send_signal(signal.SIGINT)  # graceful: reconnect hint, then 1012
        server.wait(timeout=15)
        wait_state(page, "reconnecting")
        shot(page, "03-reconnecting")
        assert "Reconnecting" in page.inner_text("#status")
        with server_process(db, port):
            wait_state(page, "connected", timeout=30_000)
            say(page, "And a gym?")
            page.wait_for_selector('#messages > li[data-seq="4"]')
            shot(page, "04-recovered")
            states = page.evaluate("window.__states")
            seqs = [m["seq"] for m in stored_messages(page)]
    assert states == ["connecting", "connected", "reconnecting", "connected"]
    assert seqs == ["1", "2", "3", "4"]


def test_offline_then_online_delivers_a_message_typed_offline_exactly_once(
    tmp_path: Path, page_for: Any
) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        page = page_for(port)
        wait_state(page, "connected")
        page.context.set_offline(True)
        wait_state(page, "offline")
        assert "Offline" in page.inner_text("#status")
        say(page, "Typed while offline: can I get extra towels?")
        pending = page.wait_for_selector('#messages > li[data-sender="guest"]:not([data-seq])')
        assert pending is not None
        shot(page, "05-offline-pending")
        page.context.set_offline(False)
        wait_state(page, "connected")
        page.wait_for_selector('#messages > li[data-sender="guest"][data-seq="1"]')
        page.wait_for_selector('#messages > li[data-sender="ai"]')
        shot(page, "06-back-online")
        guest = [m for m in stored_messages(page) if m["sender"] == "guest"]
        assert len(guest) == 1 and guest[0]["seq"] == "1"
        assert page.evaluate("localStorage.getItem('trio-chat.outbox')") == "[]"
        # And the server stored it once: reload and count.
        page.reload()
        page.wait_for_selector('#messages > li[data-seq="2"]')
        texts = [m["text"] for m in stored_messages(page)]
        assert texts.count("Typed while offline: can I get extra towels?") == 1


def test_escalation_to_staff_shows_the_staff_reply_in_staff_styling(
    tmp_path: Path, page_for: Any
) -> None:
    port = free_port()
    db = tmp_path / "chat.db"
    with server_process(db, port):
        token = staff_token(db, "Anna")
        page = page_for(port, width=390, height=780)  # a phone-sized screen
        wait_state(page, "connected")
        say(page, "Hello!")
        page.wait_for_selector('#messages > li[data-sender="ai"]')
        page.click("#escalate")
        page.wait_for_selector('#messages > li[data-sender="system"]')
        errors: list[BaseException] = []
        done = threading.Event()

        async def desk() -> None:
            async with StaffClient(f"ws://127.0.0.1:{port}/ws", token=token) as staff:
                with trio.fail_after(20):
                    await staff.wait_until(
                        lambda: any(s.status == "waiting" for s in staff.queue.values())
                    )
                    waiting = next(c for c, s in staff.queue.items() if s.status == "waiting")
                    await staff.claim(waiting)
                    reply = await staff.reply(
                        waiting, "Hi, Anna here at reception. How can I help?"
                    )
                    await staff.mark_read(reply.seq - 2, waiting)  # she has read the guest
                    await staff.ping()

        def run_desk() -> None:
            try:
                trio.run(desk)
            except BaseException as exc:  # reported in the test thread
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=run_desk, daemon=True).start()
        staff_item = page.wait_for_selector('#messages > li[data-sender="staff"]', timeout=20_000)
        assert done.wait(20) and not errors, errors
        assert staff_item is not None
        assert "Anna" in staff_item.inner_text()
        colours = page.evaluate("""() => {
          const style = s => getComputedStyle(document.querySelector(
              `#messages > li[data-sender="${s}"]`)).backgroundColor;
          return {staff: style("staff"), ai: style("ai"), guest: style("guest")};
        }""")
        assert len(set(colours.values())) == 3, colours
        page.wait_for_selector('#messages > li[data-sender="guest"][data-read="true"]')
        assert "Seen" in page.inner_text('#messages > li[data-sender="guest"]')
        shot(page, "07-staff-reply-phone")


def test_keyboard_only_and_announced_status(tmp_path: Path, page_for: Any) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        page = page_for(port)
        wait_state(page, "connected")
        assert page.get_attribute("#status", "aria-live") == "polite"
        page.keyboard.press("Tab")  # the first stop is the message box
        assert page.evaluate("document.activeElement.id") == "input"
        page.keyboard.type("Do you have a spa?")
        page.keyboard.press("Enter")
        page.wait_for_selector('#messages > li[data-sender="ai"]')
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "escalate"


def test_a_rejected_token_stops_and_tells_the_guest(
    tmp_path: Path, page_for: Any, browser: Any
) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        context = browser.new_context()
        context.add_init_script(
            "localStorage.setItem('trio-chat.token', 'g.g_forged.AAAAAAAAAAAAAAAA');"
        )
        page = context.new_page()
        page.clock.install()  # fake timers: minutes of backoff run in an instant
        page.goto(f"http://127.0.0.1:{port}/")
        wait_state(page, "closed")
        notice = page.wait_for_selector("#notice:not([hidden])")
        assert notice is not None and "could not verify" in notice.inner_text()
        shot(page, "08-closed-4401")
        page.clock.run_for(120_000)  # two minutes later it has not tried again
        assert page.evaluate("window.trioChat.attempt") == 1
        assert page.get_attribute("#status", "data-state") == "closed"
        context.close()


def test_becoming_visible_again_reconnects_at_once(tmp_path: Path, browser: Any) -> None:
    port = free_port()
    db = tmp_path / "chat.db"
    context = browser.new_context()
    context.add_init_script(RECORD_STATES)
    page = context.new_page()
    page.clock.install()
    with server_process(db, port) as server:
        page.goto(f"http://127.0.0.1:{port}/")
        wait_state(page, "connected")
        # From here the page's timers only fire when the test advances its clock.
        page.clock.pause_at(page.evaluate("Date.now()") + 5)
        server.kill()
        server.wait(timeout=10)
    wait_state(page, "reconnecting")
    page.clock.run_for(60_000)  # a minute of failed attempts, the waits growing
    # The last attempt's refusal arrives as real I/O, not a timer: wait until the page
    # is between attempts, its next try scheduled on the paused clock.
    # A function, not an expression: once the first check fails, Playwright evals an
    # expression in the page, which the page's Content-Security-Policy forbids.
    page.wait_for_function(
        "() => window.trioChat.ws === null && window.trioChat.retryTimer !== null"
    )
    attempts = page.evaluate("window.trioChat.attempt")
    assert attempts > 3 and page.evaluate("window.trioChat.retryTimer !== null")
    with server_process(db, port):
        # The next try is scheduled on a clock that no longer moves: only showing the
        # tab again can bring the page back now.
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        wait_state(page, "connected")
        assert page.evaluate("window.trioChat.attempt") == attempts + 1
        shot(page, "09-visible-again")
    context.close()


def test_after_a_crash_the_first_retry_is_spread_over_5_s(tmp_path: Path, browser: Any) -> None:
    port = free_port()
    context = browser.new_context()
    # Every guest's page draws the same 0.9: the spread alone sets the wait.
    context.add_init_script("Math.random = () => 0.9")
    page = context.new_page()
    page.clock.install()
    with server_process(tmp_path / "chat.db", port) as server:
        page.goto(f"http://127.0.0.1:{port}/")
        wait_state(page, "connected")
        page.clock.run_for(11_000)  # the connection is now a healthy one
        server.kill()
        server.wait(timeout=10)
    wait_state(page, "reconnecting")
    # 0.9 of 5 s, where full jitter alone would give 0.9 of 0.5 s.
    assert page.evaluate("window.trioChat.retryDelay") == pytest.approx(4_500)
    context.close()


def test_the_concierge_s_answer_grows_on_the_page_and_gives_way_to_the_stored_one(
    tmp_path: Path, page_for: Any
) -> None:
    from ..server.fake_llm import FakeLlm, Stream

    fake = FakeLlm()
    fake.script["What time is breakfast?"] = [Stream(["Breakfast ", "is from ", "seven."], gap=0.4)]
    started = threading.Event()
    running: list[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = []

    async def run_fake() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.run)
            running.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            started.set()

    thread = threading.Thread(target=trio.run, args=(run_fake,), daemon=True)
    thread.start()
    assert started.wait(10)
    port = free_port()
    flags = ["--concierge", "llm", "--llm-url", fake.url, "--llm-model", "fake"]
    try:
        with server_process(tmp_path / "chat.db", port, *flags):
            page = page_for(port)
            wait_state(page, "connected")
            say(page, "What time is breakfast?")
            draft = page.wait_for_selector("#messages > li.draft")
            assert draft is not None
            grown = draft.inner_text()
            page.wait_for_selector('#messages > li[data-sender="ai"][data-seq="2"]')
            assert page.eval_on_selector_all("#messages > li.draft", "l => l.length") == 0
            [stored] = [m for m in stored_messages(page) if m["sender"] == "ai"]
            assert stored["text"] == "Breakfast is from seven."
            assert "Breakfast" in grown
    finally:
        trio_token, scope = running[0]
        trio_token.run_sync_soon(scope.cancel)
        thread.join(10)
