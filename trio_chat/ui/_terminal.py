"""``trio-chat chat``: a guest (or staff) client for a person at a terminal.

Everything a guest (or the server) wrote is printed as Rich ``Text``, never as markup,
and through :func:`printable`, so ``[/x]`` is shown, not parsed, and an escape
sequence is shown as ``\\x1b[2J``, not obeyed.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ..client._client import ChatClient, ClientEvent, StaffClient
from ..core.client_protocol import ConversationSummary
from ..core.errors import TrioChatError
from ..core.protocol import Message
from ._text import printable

STYLES = {
    "guest": ("You", "bold cyan"),
    "ai": ("Concierge", "green"),
    "staff": ("Staff", "bold magenta"),
    "system": ("·", "dim italic"),
}
STATE_STYLES = {
    "connecting": "yellow",
    "connected": "green",
    "reconnecting": "yellow",
    "offline": "red",
    "closed": "red",
}
REPLY_GRACE = 10.0  # seconds to wait for the conversation to settle after input ends
GUEST_HELP = "Type a message and press Enter. /person asks for staff, /quit leaves."
STAFF_HELP = (
    "/queue lists conversations; /claim ID, /watch ID, /release, /resolve act on one; "
    "plain text replies to the current conversation; /quit leaves."
)


def status_line(client: ChatClient) -> Text:
    """The one-line connection status: state, attempt, next retry countdown."""
    state = client.state
    text = Text("● ", style=STATE_STYLES[state])
    text.append(state, style=f"bold {STATE_STYLES[state]}")
    if state in ("connecting", "reconnecting") and client.attempt:
        text.append(f"  attempt {client.attempt}")
    if client.retry_at is not None:
        remaining = max(0.0, client.retry_at - trio.current_time())
        text.append(f"  next try in {remaining:.1f} s")
    if state == "closed" and client.close_reason:
        text.append(f"  ({printable(client.close_reason)})")
    if client.pending:
        text.append(f"  {len(client.pending)} waiting to send", style="yellow")
    if client.typing.get("ai") or client.typing.get("staff"):
        text.append("  typing…", style="dim")
    return text


def render_message(message: Message, role: str) -> Text:
    label, style = STYLES.get(message.sender, (message.sender, ""))
    if message.sender == "staff" and message.author:
        label = message.author
    if role == "staff" and message.sender == "guest":
        label = "Guest"
    body = printable(message.text, multiline=True)
    text = Text()
    if message.sender == "system":
        text.append(f"  {body}", style=style)
        return text
    text.append(f"{printable(label)}: ", style=style)
    text.append(body)
    return text


def render_summary(summary: ConversationSummary) -> Text:
    """One line of the staff queue: online dot, id, status, guest, last message."""
    online = "●" if summary.guest_online else "○"
    preview = printable((summary.preview or "")[:60])
    return Text(
        f"{online} {printable(summary.conversation_id)}  {printable(summary.status):8} "
        f"{printable(summary.guest_label)}: {preview}"
    )


class TerminalChat:
    """One person at a terminal: reads lines, prints the conversation, shows status."""

    def __init__(self, client: ChatClient, console: Console) -> None:
        self.client = client
        self.console = console
        self.conversation: str | None = None  # staff: the conversation plain text goes to
        self._shown_state: str | None = None
        self._acted_after: int | None = None  # seq held when the guest last did something
        self._sends: trio.Nursery | None = None

    async def run(self, read_line: Callable[[], Awaitable[str]] | None = None) -> int:
        """Chat until the user quits or input ends. ``read_line`` gives the next line
        of input ("" at its end); by default standard input's."""
        client = self.client
        staff = isinstance(client, StaffClient)
        self.console.print(Text(STAFF_HELP if staff else GUEST_HELP, style="dim"))
        async with client, trio.open_nursery() as nursery:
            self._sends = nursery
            with Live(
                status_line(client), console=self.console, refresh_per_second=4, transient=True
            ) as live:
                # Printed as they happen, in the client's own task: nothing lags behind.
                remove = client.add_listener(lambda event: self._show(event, live))
                nursery.start_soon(self._refresh_status, live)
                try:
                    await self._read_input(read_line or _read_stdin)
                finally:
                    remove()
                nursery.cancel_scope.cancel()
        if not staff and client.token:
            self.console.print(
                Text(f"Come back as the same guest with --token {client.token}", style="dim")
            )
        return 0 if client.close_reason in (None, "closed by the client") else 1

    async def _refresh_status(self, live: Live) -> None:
        while True:
            live.update(status_line(self.client))
            await trio.sleep(0.25)

    def _show(self, event: ClientEvent, live: Live) -> None:
        self._print_event(event)
        live.update(status_line(self.client))

    def _print_event(self, event: ClientEvent) -> None:
        client, console = self.client, self.console
        if event.kind == "message":
            console.print(render_message(event.data["message"], client.role))
        elif event.kind == "error":
            why = printable(f"{event.data.get('code')}: {event.data.get('message')}")
            console.print(Text(f"! {why}", style="red"))
        elif event.kind == "state" and event.data["state"] != self._shown_state:
            # Each attempt and wait is a state event; the status line shows those.
            state = self._shown_state = event.data["state"]
            console.print(Text(f"[{state}]", style=STATE_STYLES[state]))
        elif event.kind == "status" and client.role == "guest":
            assigned = event.data.get("assigned_to")
            with_whom = f", with {printable(assigned)}" if assigned else ""
            console.print(
                Text(
                    f"[conversation: {printable(str(event.data.get('status')))}{with_whom}]",
                    style="dim",
                )
            )

    async def _read_input(self, read_line: Callable[[], Awaitable[str]]) -> None:
        client = self.client
        while True:
            line = await read_line()
            if not line:  # end of input
                await self._finish()
                return
            line = line.strip()
            if line in ("/quit", "/exit"):
                return
            if not line:
                continue
            try:
                if isinstance(client, StaffClient):
                    await self._staff_command(client, line)
                else:
                    self._acted_after = client.transcript[-1].seq if client.transcript else 0
                    await self._guest_command(line)
            except TrioChatError as exc:
                self.console.print(Text(f"! {printable(str(exc))}", style="red"))

    async def _finish(self) -> None:
        """Input ended (a pipe, or Ctrl-D): deliver what waits, show the conversation,
        and give the last thing the guest did a moment to be answered."""
        client = self.client
        with trio.move_on_after(REPLY_GRACE):
            if client.pending:
                self.console.print(Text("delivering what is waiting…", style="dim"))
            await client.wait_until(lambda: client.synced and not client.pending)
            if self._acted_after is not None and client.role == "guest":
                mark = self._acted_after
                await client.wait_until(
                    lambda: (
                        any(m.seq > mark and m.sender != "guest" for m in client.transcript)
                        and not client.typing.get("ai")
                    )
                )
            # Whatever the server sent before answering this has now been shown.
            await client.ping()

    def _in_background(self, send: Callable[..., Awaitable[Any]], *args: Any) -> None:
        # The prompt stays usable while a message waits for its ack or the network.
        async def deliver() -> None:
            try:
                await send(*args)
            except TrioChatError as exc:
                self.console.print(Text(f"! not sent: {printable(str(exc))}", style="red"))

        assert self._sends is not None
        self._sends.start_soon(deliver)

    async def _guest_command(self, line: str) -> None:
        if line == "/person":
            await self.client.escalate("asked at the terminal")
        elif line.startswith("/"):
            self.console.print(Text(GUEST_HELP, style="dim"))
        else:
            self._in_background(self.client.send, line)

    async def _staff_command(self, client: StaffClient, line: str) -> None:
        command, _, argument = line.partition(" ")
        target = argument.strip() or self.conversation
        if command == "/queue":
            await client.wait_until(lambda: client.queue_ready)
            for summary in sorted(client.queue.values(), key=lambda s: s.updated_ts, reverse=True):
                self.console.print(render_summary(summary))
        elif command in ("/claim", "/watch", "/release", "/resolve"):
            if not target:
                self.console.print("which conversation? /queue lists them")
                return
            action = {
                "/claim": client.claim,
                "/watch": client.watch,
                "/release": client.release,
                "/resolve": client.resolve,
            }[command]
            await action(target)
            if command in ("/claim", "/watch"):
                self.conversation = target
                self.console.print(Text(f"now in {printable(target)}", style="dim"))
                for message in client.transcript_of(target)[-10:]:
                    self.console.print(render_message(message, "staff"))
        elif line.startswith("/"):
            self.console.print(Text(STAFF_HELP, style="dim"))
        elif self.conversation is None:
            self.console.print("claim a conversation first (/queue, /claim ID)")
        else:
            self._in_background(client.reply, self.conversation, line)


async def _read_stdin() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def main(
    url: str,
    token: str | None,
    name: str | None,
    staff_token: str | None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Run the terminal client until the user quits or input ends. ``ssl_context``
    verifies a ``wss://`` server (default: the system's CAs)."""
    client: ChatClient
    if staff_token is not None:
        client = StaffClient(url, token=staff_token, name=name, ssl_context=ssl_context)
    else:
        client = ChatClient(url, token=token, name=name, ssl_context=ssl_context)
    return await TerminalChat(client, Console()).run()
