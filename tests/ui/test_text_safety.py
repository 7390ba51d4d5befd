"""Guest-supplied text stays text: in the staff terminal, the widgets and the page.

Guests choose their names and their messages. Each hostile string here goes through
the real server and comes out, in every interface, as the characters it is: Rich
markup is not parsed, an escape sequence is shown (``\\x1b``), not obeyed, HTML is
not made into elements. The server also drops control characters from names.

The ``attack_*`` functions are importable on their own (no fixture): each attacks a
server on 127.0.0.1:port and asserts what it answers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing
import trio_websocket
from rich.console import Console

from trio_chat import ChatClient, ChatServer, StaffClient
from trio_chat.core import protocol as proto
from trio_chat.ui._terminal import TerminalChat
from trio_chat.ui._text import printable

from ..conftest import make_config
from ..helpers import free_port, server_process, staff_token

# Hostile names, and what staff see of each (the server drops control characters).
HOSTILE_NAMES: Final = {
    "[/x]": "[/x]",  # a closing tag without an opening one: Rich's MarkupError
    "[link=http://evil]click[/link]": "[link=http://evil]click[/link]",  # a hyperlink
    "\x1b[2JEve\x9b": "[2JEve",  # clear the screen; a C1 control sequence introducer
    "<img src=x onerror=alert(1)>": "<img src=x onerror=alert(1)>",  # HTML
}
# Hostile message text: shown with each control character as its escape.
HOSTILE_TEXT: Final = "[/x] [link=http://evil]click[/link] \x1b[2J\x1b]0;owned\x07 <b>bold</b>"
SHOWN_TEXT: Final = "[/x] [link=http://evil]click[/link] \\x1b[2J\\x1b]0;owned\\x07 <b>bold</b>"


# ------------------------------------------------------------------------- attacks


async def _hostile_guest(port: int, name: str, staff_token: str | None) -> None:
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{port}/ws", connect_timeout=5, disconnect_timeout=2
        ) as ws:
            await ws.send_message(json.dumps({"type": "hello", "token": None, "name": name}))
            welcome = json.loads(await ws.get_message())
            assert welcome["type"] == "welcome", welcome  # accepted, not refused
            await ws.send_message(
                json.dumps({"type": "message", "client_msg_id": "m1", "text": HOSTILE_TEXT})
            )
            while (frame := json.loads(await ws.get_message()))["type"] != "ack":
                assert frame["type"] != "error", frame
            conversation_id = welcome["conversation_id"]
        if staff_token is None:
            return
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{port}/ws", connect_timeout=5, disconnect_timeout=2
        ) as ws:
            await ws.send_message(json.dumps({"type": "hello", "token": staff_token}))
            while (frame := json.loads(await ws.get_message()))["type"] != "queue":
                pass
            entry = next(
                c for c in frame["conversations"] if c["conversation_id"] == conversation_id
            )
            assert entry["guest_name"] == HOSTILE_NAMES[name], entry
            assert entry["preview"].startswith("[/x] [link=http://evil]"), entry


async def attack_markup_closing_tag_name(port: int, *, staff_token: str | None = None) -> None:
    """A guest named ``[/x]``: welcomed; with a staff token, staff see the name as is."""
    await _hostile_guest(port, "[/x]", staff_token)


async def attack_markup_link_name(port: int, *, staff_token: str | None = None) -> None:
    """A guest named ``[link=http://evil]click[/link]``: welcomed, the name kept as text."""
    await _hostile_guest(port, "[link=http://evil]click[/link]", staff_token)


async def attack_escape_sequence_name(port: int, *, staff_token: str | None = None) -> None:
    """A guest named ``\\x1b[2JEve\\x9b``: welcomed; staff see ``[2JEve`` (controls gone)."""
    await _hostile_guest(port, "\x1b[2JEve\x9b", staff_token)


async def attack_html_name(port: int, *, staff_token: str | None = None) -> None:
    """A guest named ``<img src=x onerror=alert(1)>``: welcomed, the name kept as text."""
    await _hostile_guest(port, "<img src=x onerror=alert(1)>", staff_token)


async def test_the_attacks_are_answered_as_their_docstrings_say(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start(nursery, tmp_path)
    assert server.port
    token = staff_token(tmp_path / "chat.db", "Sam")
    for attack in (
        attack_markup_closing_tag_name,
        attack_markup_link_name,
        attack_escape_sequence_name,
        attack_html_name,
    ):
        await attack(server.port, staff_token=token)


# ---------------------------------------------------------------------- the parts


def test_hello_names_lose_their_control_characters() -> None:
    def name(raw: str) -> str | None:
        hello = proto.parse_client_frame(json.dumps({"type": "hello", "name": raw}))
        assert isinstance(hello, proto.Hello)
        return hello.name

    assert name("\x1b[2JEve\x9b") == "[2JEve"
    assert name(" Ana\tMaria\n\x00\x7f ") == "AnaMaria"
    assert name("\x1b\x07") is None  # nothing left: no name
    assert name("[/x] <b>Zoë</b> 山田") == "[/x] <b>Zoë</b> 山田"  # only controls go


def test_printable_shows_control_characters_as_escapes() -> None:
    assert printable("a\x1b[2Jb\x9b\x7f\u202e") == "a\\x1b[2Jb\\x9b\\x7f\\u202e"
    assert printable("two\nlines\tand\r", multiline=True) == "two\nlines\tand\\x0d"
    assert printable("two\nlines") == "two\\x0alines"  # a name is one line
    assert printable("[b]Zoë[/b] <i>") == "[b]Zoë[/b] <i>"


# ------------------------------------------------------- through the real server


async def start(nursery: trio.Nursery, tmp_path: Path) -> ChatServer:
    server = ChatServer(make_config(tmp_path, concierge="off"))
    await nursery.start(server.run)
    return server


async def hostile_guests(url: str) -> list[str]:
    """One guest per hostile name, each having sent the hostile text; their
    conversations."""
    conversations = []
    for name in HOSTILE_NAMES:
        async with ChatClient(url, name=name) as guest:
            await guest.send(HOSTILE_TEXT)
            assert guest.conversation_id is not None
            conversations.append(guest.conversation_id)
    return conversations


def scripted(lines: list[str]) -> Callable[[], Awaitable[str]]:
    remaining = list(lines)

    async def read_line() -> str:
        await trio.lowlevel.checkpoint()
        return remaining.pop(0) + "\n" if remaining else ""

    return read_line


async def test_the_staff_terminal_shows_hostile_guests_literally(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start(nursery, tmp_path)
    url = f"ws://127.0.0.1:{server.port}/ws"
    with trio.fail_after(30):
        conversations = await hostile_guests(url)
        recorded = Console(record=True, file=io.StringIO(), width=300)
        staff = StaffClient(url, token=staff_token(tmp_path / "chat.db", "Sam"))
        lines = ["/queue", *(f"/watch {c}" for c in conversations)]
        # A MarkupError (a guest named [/x]) would end run() with it.
        assert await TerminalChat(staff, recorded).run(scripted(lines)) == 0
    shown = recorded.export_text(clear=False)
    assert "\x1b" not in shown and "\x9b" not in shown and "\x07" not in shown, repr(shown)
    queue = [line for line in shown.splitlines() if line.startswith(("●", "○"))]
    assert len(queue) == len(HOSTILE_NAMES)
    for visible_name in HOSTILE_NAMES.values():
        assert any(f" {visible_name}: [/x] [link=http://evil]" in line for line in queue), queue
    assert shown.count(f"Guest: {SHOWN_TEXT}") == len(HOSTILE_NAMES)
    html = recorded.export_html()
    assert "http://evil" in html and 'href="http://evil"' not in html  # text, no link


async def test_the_widgets_show_hostile_text_escaped(nursery: trio.Nursery, tmp_path: Path) -> None:
    widgets = pytest.importorskip("trio_chat.ui.widgets")
    server = await start(nursery, tmp_path)
    url = f"ws://127.0.0.1:{server.port}/ws"
    db = tmp_path / "chat.db"
    with trio.fail_after(30):
        await hostile_guests(url)
        async with (
            ChatClient(url, name="<img src=x onerror=alert(1)>") as guest,
            StaffClient(url, token=staff_token(db, "<img src=x onerror=alert(2)>")) as staff,
        ):
            guest_view = widgets.GuestChatWidget(guest, nursery.start_soon)
            console = widgets.StaffConsoleWidget(staff, nursery.start_soon)
            await guest.send(HOSTILE_TEXT)
            await guest.escalate()
            conversation = guest.conversation_id
            assert conversation is not None
            await staff.wait_until(lambda: conversation in staff.queue)
            console.queue.value = conversation  # selected: the console watches it
            await staff.claim(conversation)
            await staff.reply(conversation, "<script>alert(3)</script>\x1b[2J")
            await staff.set_typing(True, conversation)
            await guest.wait_until(lambda: guest.typing.get("staff", False))
            await staff.wait_until(lambda: len(staff.transcript_of(conversation)) >= 3)
            await trio.testing.wait_all_tasks_blocked(0.05)

            shown_to_staff = console.transcript.value
            escaped_text = SHOWN_TEXT.replace("<", "&lt;").replace(">", "&gt;")
            assert escaped_text in shown_to_staff
            assert "&lt;script&gt;alert(3)&lt;/script&gt;\\x1b[2J" in shown_to_staff
            shown_to_guest = guest_view.transcript.value + guest_view.typing.value
            assert "&lt;img src=x onerror=alert(2)&gt;" in shown_to_guest  # the staff name
            for html in (shown_to_staff, shown_to_guest):
                assert "<img" not in html and "<script" not in html and "<b>" not in html
                assert "\x1b" not in html and "\x07" not in html
            labels = [label for label, _ in console.queue.options]
            for visible_name in HOSTILE_NAMES.values():
                assert any(visible_name in label for label in labels), labels
            assert not any("\x1b" in label or "\x9b" in label for label in labels)


# ------------------------------------------------------------------------ the page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE_TEXT: Final = "<img src=x onerror=alert(1)> [link=http://evil]click[/link] <b>bold</b>"


@pytest.mark.slow
def test_the_page_shows_hostile_text_as_text(tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is required under CI=true", pytrace=False)
        pytest.skip("Chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    db = tmp_path / "chat.db"
    with server_process(db, port, "--concierge", "off"), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        try:
            page = browser.new_page()
            dialogs: list[str] = []

            def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector('#status[data-state="connected"]', timeout=15_000)
            page.fill("#input", PAGE_TEXT)
            page.press("#input", "Enter")
            page.wait_for_selector('#messages > li[data-sender="guest"][data-seq]')
            page.click("#escalate")
            page.wait_for_selector('#messages > li[data-sender="system"]')

            async def desk() -> None:
                token = staff_token(db, "<img src=x onerror=alert(2)>")
                with trio.fail_after(20):
                    async with StaffClient(f"ws://127.0.0.1:{port}/ws", token=token) as staff:
                        await staff.wait_until(
                            lambda: any(s.status == "waiting" for s in staff.queue.values())
                        )
                        waiting = next(c for c, s in staff.queue.items() if s.status == "waiting")
                        await staff.claim(waiting)
                        await staff.reply(waiting, "<script>alert(3)</script><b>hi</b>")

            trio.run(desk)
            page.wait_for_selector('#messages > li[data-sender="staff"]', timeout=20_000)
            found: dict[str, Any] = page.evaluate(
                """() => {
                  const log = document.getElementById("messages");
                  const text = (s) => log.querySelector(`li[data-sender="${s}"] .body`).textContent;
                  return {
                    elements: log.querySelectorAll("img, script, b, a").length,
                    guest: text("guest"),
                    staff: text("staff"),
                    who: log.querySelector('li[data-sender="staff"] .who').textContent,
                  };
                }"""
            )
            assert found["elements"] == 0, found
            assert found["guest"] == PAGE_TEXT
            assert found["staff"] == "<script>alert(3)</script><b>hi</b>"
            assert found["who"].startswith("<img src=x onerror=alert(2)>")
            assert dialogs == []
        finally:
            browser.close()
