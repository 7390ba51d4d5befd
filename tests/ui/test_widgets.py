"""The notebook widgets, driven from Python: set values, click, read what they show."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trio_chat import Backoff, ChatClient, ChatServer, StaffClient

from ..conftest import make_config
from ..helpers import staff_token

widgets = pytest.importorskip("trio_chat.ui.widgets")


async def start(nursery: trio.Nursery, tmp_path: Path) -> ChatServer:
    server = ChatServer(make_config(tmp_path))
    await nursery.start(server.run)
    return server


async def test_guest_widget_sends_shows_kinds_and_status(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start(nursery, tmp_path)
    async with ChatClient(f"ws://127.0.0.1:{server.port}/ws") as client:
        widget = widgets.GuestChatWidget(client, nursery.start_soon)
        await client.wait_for_state("connected")
        assert 'data-state="connected"' in widget.status.value
        assert "Connected" in widget.status.value
        widget.input.value = "What time is breakfast?"  # Enter commits the value
        assert widget.input.value == ""
        with trio.fail_after(5):
            await client.wait_until(lambda: len(client.transcript) >= 2)
        shown = widget.transcript.value
        assert 'data-sender="guest"' in shown and 'data-sender="ai"' in shown
        assert ">You<" in shown and ">Concierge<" in shown
        assert "flex-end" in shown and "flex-start" in shown  # sides differ

        widget.offline_button.value = True  # go offline
        await client.wait_for_state("offline")
        assert 'data-state="offline"' in widget.status.value
        assert widget.offline_button.description == "Go online"
        widget.input.value = "typed offline"
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert "sending…" in widget.transcript.value  # shown as pending
        widget.offline_button.value = False
        with trio.fail_after(5):
            await client.wait_until(lambda: not client.pending)
        assert "sending…" not in widget.transcript.value

        widget.person_button.click()
        with trio.fail_after(5):
            await client.wait_until(lambda: client.status == "waiting")
        assert 'data-sender="system"' in widget.transcript.value


async def test_status_shows_attempt_and_countdown_while_reconnecting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from ..helpers import free_port

    port = free_port()  # nobody listens: every attempt fails
    backoff = Backoff(initial=10, jitter="none")
    async with ChatClient(f"ws://127.0.0.1:{port}/ws", backoff=backoff) as client:
        widget = widgets.GuestChatWidget(client, lambda *a: None)
        await client.wait_until(lambda: client.retry_at is not None)
        await trio.sleep(2.5)
        text = widgets.status_html(client)
        assert "attempt 1" in text and "next try in 7.5 s" in text
        assert 'data-state="connecting"' in text
        assert widget.status.value.startswith('<span class="trio-chat-status"')


async def test_staff_console_lists_claims_replies_and_resolves(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start(nursery, tmp_path)
    url = f"ws://127.0.0.1:{server.port}/ws"
    token = staff_token(server.config.db_path, "Anna")
    async with ChatClient(url, name="Maria") as guest, StaffClient(url, token=token) as desk:
        console = widgets.StaffConsoleWidget(desk, nursery.start_soon)
        await guest.send("I want to speak to a person")
        with trio.fail_after(5):
            await desk.wait_until(lambda: any(s.status == "waiting" for s in desk.queue.values()))
        rows = console.queue_rows()
        assert rows[0][0].startswith("● waiting") and "Maria" in rows[0][0]
        console.queue.value = rows[0][1]  # select: the console starts watching it
        with trio.fail_after(5):
            await desk.wait_until(lambda: rows[0][1] in desk.subscribed)
        console.claim_button.click()
        with trio.fail_after(5):
            await desk.wait_until(lambda: desk.queue[rows[0][1]].status == "staff")
        console.reply.value = "Hello Maria, Anna here."
        with trio.fail_after(5):
            await guest.wait_until(lambda: guest.transcript[-1].sender == "staff")
        with trio.fail_after(5):  # the console learns of its own reply from its own push
            await desk.wait_until(lambda: "Anna here" in console.transcript.value)
        assert "→ Anna" in console.queue_rows()[0][0]
        console.resolve_button.click()
        with trio.fail_after(5):
            await guest.wait_until(lambda: guest.status == "resolved")
        console.queue.value = None
        console.claim_button.click()
        assert "Select a conversation first" in console.errors.value


async def test_guest_widget_shows_the_concierge_s_draft_as_text(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from trio_chat.server._llm import LlmSettings

    from ..server.fake_llm import FakeLlm, Stream

    fake = FakeLlm()
    await nursery.start(fake.run)
    fake.script["What time is breakfast?"] = [
        Stream(["<b>Breakfast</b> ", "is from seven."], gap=0.3)
    ]
    llm = LlmSettings(url=fake.url, model="fake", draft_interval=0.0)
    server = ChatServer(make_config(tmp_path, concierge="llm", llm=llm))
    await nursery.start(server.run)
    shown: list[str] = []
    async with ChatClient(f"ws://127.0.0.1:{server.port}/ws") as client:
        widget = widgets.GuestChatWidget(client, nursery.start_soon)
        client.add_listener(lambda e: shown.append(widget.typing.value))
        await client.send("What time is breakfast?")
        with trio.fail_after(10):
            await client.wait_until(lambda: any(m.sender == "ai" for m in client.transcript))
    drafted = [v for v in shown if "Concierge" in v]
    assert drafted and "&lt;b&gt;Breakfast&lt;/b&gt;" in drafted[0]  # text, not markup
    assert "<b>Breakfast" not in "".join(drafted)
    assert widget.typing.value == ""  # the stored answer took the draft's place
