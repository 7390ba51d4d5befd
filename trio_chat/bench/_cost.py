"""The CPU cost of one message, counted, not timed: the server runs under callgrind, and
the instructions it executes (every thread: the event loop and the database writer)
while guests send a fixed number of messages are divided by that number.

Throughput on this machine swings by a third between rounds, so two versions of the
server whose costs differ by a few per cent cannot be told apart by timing them. An
instruction count does not depend on what else the machine is doing; it still moves a
little with timing (how many messages a commit batches), which the rounds show.
Instructions are not time: a cost that is waiting (``fsync``) is not in them, which is
why this figure sits beside the timed ones, not instead of them.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Final

import trio
import trio_websocket

from ._peers import FRESH_SQLITE, Storage, Target, on_storage, serving
from ._scenarios import Figure, Steps

__all__ = ["scenario_cost", "valgrind_available"]

WARM_UP: Final = 5  # messages per guest before counting: caches, first allocations
_TOTALS: Final = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def valgrind_available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


async def _control(pid: int, *args: str) -> None:
    await trio.run_process(["callgrind_control", *args, str(pid)], capture_stdout=True)


async def _guest_messages(
    ws: trio_websocket.WebSocketConnection, name: str, count: int, answered: bool = False
) -> None:
    """``count`` messages, each sent once the previous one is acknowledged (and, with
    ``answered``, once the concierge's answer to it has come: its typing stops with it)."""
    for k in range(count):
        frame = {"type": "message", "client_msg_id": f"{name}-{k}", "text": f"message {k}"}
        await ws.send_message(json.dumps(frame))
        acked, replied = False, not answered
        while not (acked and replied):
            got = str(await ws.get_message())
            acked = acked or '"type":"ack"' in got
            replied = replied or ('"type":"typing"' in got and '"active":false' in got)


async def _counted_rounds(
    url: str,
    pid: int,
    out_dir: Path,
    guests: int,
    messages: int,
    rounds: int,
    dialect: str,
    answered: bool = False,
) -> list[float]:
    """Instructions per message in each of ``rounds`` rounds on one running server
    (``answered``: each guest waits for the concierge's answer too)."""
    per_message: list[float] = []
    async with trio.open_nursery() as nursery:
        sockets = []
        for _ in range(guests):
            ws = await trio_websocket.connect_websocket_url(nursery, url)
            if dialect == "chat":
                await ws.send_message(json.dumps({"type": "hello", "token": None}))
                await ws.get_message()
            sockets.append(ws)

        async def everyone(count: int, tag: str) -> None:
            async with trio.open_nursery() as load:
                for i, ws in enumerate(sockets):
                    if dialect == "chat":
                        load.start_soon(_guest_messages, ws, f"{tag}{i}", count, answered)
                    else:
                        load.start_soon(_echo_messages, ws, count)

        await everyone(WARM_UP, "w")
        for r in range(rounds):
            await _control(pid, "-z")
            await _control(pid, "-i", "on")
            await everyone(messages, f"r{r}-")
            await _control(pid, "-i", "off")
            await _control(pid, "-d")
            total = await trio.to_thread.run_sync(_latest_totals, out_dir, pid)
            per_message.append(total / (guests * messages))
        for ws in sockets:
            await ws.aclose()
    return per_message


def _latest_totals(out_dir: Path, pid: int) -> int:
    """The instruction total of the newest dump callgrind wrote for ``pid``."""
    dumps = sorted(out_dir.glob(f"cg.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    found = _TOTALS.search(dumps[-1].read_text()) if dumps else None
    if found is None:
        raise RuntimeError(f"callgrind wrote no totals for {pid} in {out_dir}")
    return int(found.group(1))


async def _echo_messages(ws: trio_websocket.WebSocketConnection, count: int) -> None:
    for k in range(count):
        await ws.send_message(f"message {k}")
        await ws.get_message()


async def scenario_cost(
    guests: int,
    messages: int,
    rounds: int,
    steps: Steps,
    old_code: str = "",
    storage: Storage = FRESH_SQLITE,
    paced: bool = False,
) -> tuple[list[Figure], dict[str, Any]]:
    """Instructions per acknowledged message for trio-chat (concierge off and on), the
    bare trio-websocket echo, and the server from ``old_code`` when given; medians of
    ``rounds`` rounds of ``guests`` x ``messages`` messages. On PostgreSQL
    (``storage``) the count is the server's alone: the database's work is not in it.

    ``paced``: each guest also waits for the concierge's answer before its next
    message. How many writes share a commit then no longer drifts with the server's
    speed (a faster reply otherwise meets fewer guest messages to commit with), so a
    change in the code's cost shows as itself."""
    if not valgrind_available():
        raise RuntimeError("the cost scenario needs valgrind (apt-get install valgrind)")
    targets = [Target("chat", "chat"), Target("chat", "chat", "rules")]
    if old_code:
        targets += [
            Target("chat", "chat", code=old_code),
            Target("chat", "chat", "rules", code=old_code),
        ]
    targets = on_storage(targets, storage)
    targets.append(Target("trio-websocket", "echo"))
    steps.start("cost", len(targets))
    counted: dict[Target, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        wrap = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/cg.%p",
        ]  # fmt: skip
        for index, target in enumerate(targets):
            # A database of its own each: an earlier tree cannot open a later schema.
            workdir = out_dir / f"server-{index}"
            workdir.mkdir()
            async with serving(target, workdir, wrap=wrap, within=300) as (url, proc):
                counted[target] = await _counted_rounds(
                    url,
                    proc.pid,
                    out_dir,
                    guests,
                    messages,
                    rounds,
                    target.dialect,
                    answered=paced and target.concierge != "off",
                )
            steps.advance(target.label)
    median = {t: statistics.median(v) for t, v in counted.items()}
    new_off, new_on, echo = targets[0], targets[1], targets[-1]
    paced_note = ", each answered before the next" if paced else ""
    size = f"{guests} guests x {messages} messages{paced_note}, median of {rounds}"
    figures = [
        Figure(
            f"instructions per message, concierge off ({size})",
            median[new_off],
            median[echo],
            "instructions",
            "lower",
            "",
            "bare trio-websocket echo",
        ),
        Figure(
            f"instructions per message, concierge on ({size})",
            median[new_on],
            median[new_off],
            "instructions",
            "lower",
            "",
            "concierge off",
        ),
    ]
    if old_code:
        for new, old in ((targets[0], targets[2]), (targets[1], targets[3])):
            concierge = "off" if new.concierge == "off" else "on"
            figures.append(
                Figure(
                    f"instructions per message, concierge {concierge}: new code ({size})",
                    median[new],
                    median[old],
                    "instructions",
                    "lower",
                    # Rounds of one setup differ by up to 7 % (how many messages a
                    # commit batches): not worse means within that.
                    "<= 1.05 x",
                    "old code, same run",
                )
            )
    series = {t.label: v for t, v in counted.items()}
    return figures, {"cost": series}
