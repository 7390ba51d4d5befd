"""ipywidgets chat consoles: a guest's chat and a staff console, live through Trio.

Widget callbacks fire outside Trio; everything they start goes through ``spawn``
(``TrioInJupyter.start_soon`` in a notebook, a nursery's ``start_soon`` in tests).
Client events update the widgets synchronously, in the client's own Trio task, which
runs on the kernel's thread.

Every string a guest, a staff member or the server chose goes into HTML through
:func:`_escaped` (``html.escape`` of :func:`~trio_chat.ui._text.printable`), and into
the queue's plain-text labels through ``printable``.
"""

from __future__ import annotations

import calendar
import html
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ipywidgets as w
import trio

from ..client._client import ChatClient, ClientEvent, StaffClient
from ..core.errors import TrioChatError
from ..core.protocol import Message
from ._text import printable

__all__ = ["GuestChatWidget", "StaffConsoleWidget", "status_html"]

Spawn = Callable[..., None]

KIND_STYLE = {
    "guest": ("You", "#1d5fbf", "#ffffff", "flex-end"),
    "ai": ("Concierge", "#e8f3ec", "#1f2430", "flex-start"),
    "staff": ("Staff", "#f6ecfb", "#1f2430", "flex-start"),
    "system": ("", "transparent", "#6b7280", "center"),
}
STATE_COLOUR = {
    "connecting": "#b7791f",
    "connected": "#2e7d4f",
    "reconnecting": "#b7791f",
    "offline": "#b42318",
    "closed": "#6b7280",
}


def _escaped(text: str, *, multiline: bool = False) -> str:
    """``text`` as HTML text: markup escaped (quotes too), control characters shown."""
    return html.escape(printable(text, multiline=multiline))


def status_html(client: ChatClient, now: float | None = None) -> str:
    """The connection status, in colour and words: state, attempt, retry countdown."""
    state = client.state
    words = {
        "connecting": "Connecting",
        "connected": "Connected",
        "reconnecting": "Reconnecting",
        "offline": "Offline: no network",
        "closed": "Closed",
    }[state]
    if state in ("connecting", "reconnecting") and client.attempt:
        words += f" · attempt {client.attempt}"
    if client.retry_at is not None:
        current = trio.current_time() if now is None else now
        words += f" · next try in {max(0.0, client.retry_at - current):.1f} s"
    if state == "closed" and client.close_reason:
        words += f" ({_escaped(client.close_reason)})"
    colour = STATE_COLOUR[state]
    return (
        f'<span class="trio-chat-status" data-state="{state}" style="color:{colour};'
        f'font-weight:600">● {words}</span>'
    )


def message_html(message: Message, *, viewer: str = "guest", pending: bool = False) -> str:
    """One message as a bubble: each kind its own colour, alignment and label."""
    label, background, colour, align = KIND_STYLE.get(message.sender, KIND_STYLE["system"])
    if message.sender == "staff" and message.author:
        label = message.author
    if viewer == "staff" and message.sender == "guest":
        label, align, background, colour = "Guest", "flex-start", "#eef2f8", "#1f2430"
    elif viewer == "staff" and message.sender == "staff":
        align, background, colour = "flex-end", "#7b3fa0", "#ffffff"
    text = _escaped(message.text, multiline=True)
    style = (
        f"align-self:{align};background:{background};color:{colour};padding:6px 10px;"
        f"border-radius:10px;max-width:80%;margin:2px 0;white-space:pre-wrap;"
    )
    if message.sender == "system":
        style += "font-style:italic;font-size:90%;"
    if pending:
        style += "opacity:0.6;"
    who = f"<b style='font-size:80%'>{_escaped(label)}</b><br>" if label else ""
    meta = " · sending…" if pending else ""
    return (
        f'<div class="trio-chat-msg" data-sender="{_escaped(message.sender)}" '
        f'data-seq="{"" if pending else message.seq}" style="{style}">{who}{text}'
        f"<span style='font-size:75%;opacity:.7'>{meta}</span></div>"
    )


def _transcript_html(messages: list[Message], pending: list[Message], viewer: str) -> str:
    bubbles = [message_html(m, viewer=viewer) for m in messages]
    bubbles += [message_html(m, viewer=viewer, pending=True) for m in pending]
    return (
        "<div style='display:flex;flex-direction:column;gap:2px;padding:4px;"
        "min-height:260px;max-height:420px;overflow-y:auto'>" + "".join(bubbles) + "</div>"
    )


class GuestChatWidget:
    """A guest's chat: transcript, typing indicator, input (Enter sends), send button,
    connection status, and buttons to go offline and back."""

    def __init__(self, client: ChatClient, spawn: Spawn, *, title: str = "Guest") -> None:
        self.client = client
        self.spawn = spawn
        self.title = w.HTML(f"<h4 style='margin:4px 0'>{html.escape(title)}</h4>")
        self.status = w.HTML(status_html(client, now=0.0))
        self.transcript = w.HTML(_transcript_html([], [], "guest"))
        self.typing = w.HTML("")
        self.input = w.Text(
            placeholder="Type a message and press Enter",
            continuous_update=False,
            layout=w.Layout(width="70%"),
        )
        self.send_button = w.Button(description="Send", button_style="primary")
        self.person_button = w.Button(description="Talk to a person")
        self.offline_button = w.ToggleButton(description="Go offline", value=False)
        self.errors = w.HTML("")
        self.send_button.on_click(lambda _: self.send())
        self.person_button.on_click(lambda _: self.spawn(self._escalate))
        self.input.observe(self._on_enter, names="value")
        self.offline_button.observe(self._on_offline, names="value")
        self.view = w.VBox(
            [
                self.title,
                self.status,
                self.transcript,
                self.typing,
                w.HBox([self.input, self.send_button]),
                w.HBox([self.person_button, self.offline_button]),
                self.errors,
            ],
            layout=w.Layout(border="1px solid #ddd", padding="6px", width="100%"),
        )
        client.add_listener(self.on_event)

    def _ipython_display_(self) -> None:  # pragma: no cover - notebook display
        from IPython.display import display

        display(self.view)  # type: ignore[no-untyped-call]

    # -- user actions (called outside Trio) --

    def _on_enter(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.send()

    def send(self) -> None:
        text = self.input.value.strip()
        self.input.unobserve(self._on_enter, names="value")
        self.input.value = ""
        self.input.observe(self._on_enter, names="value")
        if text:
            self.spawn(self._send, text)

    async def _send(self, text: str) -> None:
        try:
            await self.client.send(text)
        except TrioChatError as exc:
            self.errors.value = f"<span style='color:#b42318'>Not sent: {_escaped(str(exc))}</span>"

    async def _escalate(self) -> None:
        try:
            await self.client.escalate("asked in the notebook")
        except TrioChatError as exc:
            self.errors.value = f"<span style='color:#b42318'>{_escaped(str(exc))}</span>"

    def _on_offline(self, change: dict[str, Any]) -> None:
        self.client.set_online(not change["new"])
        self.offline_button.description = "Go online" if change["new"] else "Go offline"

    # -- client events (inside Trio) --

    def on_event(self, event: ClientEvent) -> None:
        if event.kind in ("message", "ack", "queued", "state", "closed", "status"):
            self.refresh()
        if event.kind in ("typing", "draft", "message"):
            self.typing.value = self._typing_html()

    def _typing_html(self) -> str:
        """The concierge's answer as it is written, else who is typing."""
        draft = self.client.drafts.get(self.client.conversation_id or "")
        if draft:
            return (
                "<div style='color:#374151;background:#eef2ff;border-radius:8px;"
                f"padding:4px 8px;opacity:0.8'><b>Concierge</b> {_escaped(draft)} ▍</div>"
            )
        active = [s for s, on in self.client.typing.items() if on and s != "guest"]
        who = {"ai": "The concierge", "staff": self.client.assigned_to or "Staff"}
        if not active:
            return ""
        return f"<i style='color:#6b7280'>{_escaped(who.get(active[0], active[0]))} is typing…</i>"

    def refresh(self) -> None:
        client = self.client
        self.status.value = status_html(client)
        pending = [
            Message(0, client.conversation_id or "", "guest", None, m.text, "", None)
            for m in client.pending
        ]
        self.transcript.value = _transcript_html(client.transcript, pending, "guest")

    async def tick(self) -> None:
        """Keep the retry countdown moving (run it in Trio: ``spawn(widget.tick)``)."""
        while True:
            if self.client.retry_at is not None:
                self.status.value = status_html(self.client)
            await trio.sleep(0.25)


class StaffConsoleWidget:
    """A staff console: the queue (status, guest, waiting time, online dot), and for the
    selected conversation its transcript, claim/release/resolve and a reply box."""

    def __init__(self, client: StaffClient, spawn: Spawn, *, title: str = "Staff console") -> None:
        self.client = client
        self.spawn = spawn
        self.title = w.HTML(f"<h4 style='margin:4px 0'>{html.escape(title)}</h4>")
        self.status = w.HTML(status_html(client, now=0.0))
        self.queue = w.Select(options=[], rows=6, layout=w.Layout(width="100%"))
        self.transcript = w.HTML(_transcript_html([], [], "staff"))
        self.claim_button = w.Button(description="Claim", button_style="warning")
        self.release_button = w.Button(description="Release")
        self.resolve_button = w.Button(description="Resolve", button_style="success")
        self.reply = w.Text(
            placeholder="Reply to the guest (Enter sends)",
            continuous_update=False,
            layout=w.Layout(width="70%"),
        )
        self.reply_button = w.Button(description="Reply", button_style="primary")
        self.errors = w.HTML("")
        self.claim_button.on_click(lambda _: self._act(self.client.claim))
        self.release_button.on_click(lambda _: self._act(self.client.release))
        self.resolve_button.on_click(lambda _: self._act(self.client.resolve))
        self.reply_button.on_click(lambda _: self.send_reply())
        self.reply.observe(self._on_enter, names="value")
        self.queue.observe(self._on_select, names="value")
        self.view = w.VBox(
            [
                self.title,
                self.status,
                w.HTML("<b>Queue</b>"),
                self.queue,
                w.HBox([self.claim_button, self.release_button, self.resolve_button]),
                self.transcript,
                w.HBox([self.reply, self.reply_button]),
                self.errors,
            ],
            layout=w.Layout(border="1px solid #ddd", padding="6px", width="100%"),
        )
        client.add_listener(lambda event: self.refresh())

    def _ipython_display_(self) -> None:  # pragma: no cover - notebook display
        from IPython.display import display

        display(self.view)  # type: ignore[no-untyped-call]

    def _on_select(self, change: dict[str, Any]) -> None:
        # Reading a conversation before claiming it: watch it.
        selected = change["new"]
        if selected and selected not in self.client.subscribed:
            self.spawn(self._run, self.client.watch, selected)
        self.refresh()

    @property
    def selected(self) -> str | None:
        value = self.queue.value
        return str(value) if value else None

    def _act(self, action: Callable[[str], Awaitable[None]]) -> None:
        if self.selected is None:
            self.errors.value = "<span style='color:#b42318'>Select a conversation first.</span>"
            return
        self.spawn(self._run, action, self.selected)

    async def _run(self, action: Callable[[str], Awaitable[Any]], *args: Any) -> None:
        try:
            await action(*args)
            self.errors.value = ""
        except TrioChatError as exc:
            self.errors.value = f"<span style='color:#b42318'>{_escaped(str(exc))}</span>"

    def _on_enter(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.send_reply()

    def send_reply(self) -> None:
        text = self.reply.value.strip()
        self.reply.unobserve(self._on_enter, names="value")
        self.reply.value = ""
        self.reply.observe(self._on_enter, names="value")
        if text and self.selected:
            self.spawn(self._run, self.client.reply, self.selected, text)

    def queue_rows(self, now: float | None = None) -> list[tuple[str, str]]:
        """(label, conversation_id) for each conversation, waiting ones first."""
        now = time.time() if now is None else now
        order = {"waiting": 0, "staff": 1, "ai": 2, "resolved": 3}
        rows = sorted(
            self.client.queue.values(),
            key=lambda s: (order.get(s.status, 9), s.updated_ts),
        )
        out = []
        for summary in rows:
            dot = "●" if summary.guest_online else "○"
            waited = _age(summary.updated_ts, now)
            who = printable(summary.guest_label)
            holder = f" → {printable(summary.assigned_to)}" if summary.assigned_to else ""
            label = f"{dot} {printable(summary.status):8} {who:14} {waited:>6}{holder}"
            out.append((label, summary.conversation_id))
        return out

    def refresh(self) -> None:
        self.status.value = status_html(self.client)
        selected = self.selected
        rows = self.queue_rows()
        if [r[1] for r in rows] != [o[1] for o in self.queue.options] or rows != list(
            self.queue.options
        ):
            self.queue.options = rows
            if selected in [r[1] for r in rows]:
                self.queue.value = selected
        if self.selected is not None:
            messages = self.client.transcript_of(self.selected)
            self.transcript.value = _transcript_html(messages, [], "staff")


def _age(iso: str | None, now: float) -> str:
    if not iso:
        return ""
    try:
        seconds = now - calendar.timegm(time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return ""
    minutes = max(0, int(seconds // 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"
