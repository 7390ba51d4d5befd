"""Where a server's time goes, per message: py-spy samples the server alone while the
load generator keeps it busy, and each sample is charged to one stage of a message's
trip (parse, validate, hub, store, encode, write, scheduler) by the innermost frame
that names one.

The same run profiles the bare trio-websocket echo under the same load, so every
stage's cost stands beside what a server that does nothing but WebSocket pays.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Final

import trio

from ._peers import FRESH_SQLITE, Storage, Target, on_storage, serving
from ._scenarios import Figure, Steps, closed_loop

__all__ = ["STAGES", "classify", "py_spy", "scenario_profile"]

# (where the frame's file lies, which functions (None: all), the stage). Matched
# against each sample's frames from the innermost outwards; the first hit decides.
# Both the current tree and earlier ones (``--compare-with``) are covered: before the
# session core, the codec was ``trio_chat/_protocol.py`` and the rules ``_server.py``;
# before the tree by layer, the shell's modules lay at the package's top.
_PARSING: Final = frozenset({"_loads", "_parse_float", "_reject_constant"})
_VALIDATING: Final = frozenset(
    {"parse_client_frame", "__init__", "bad", "string", "integer", "boolean", "identifier"}
)
_SERVER_WRITES: Final = frozenset(
    {"deliver", "flush", "_write", "send_frames", "_writer_done", "close_without_reply"}
)
_RULES: Final[tuple[tuple[str, frozenset[str] | None, str], ...]] = (
    *(
        rule
        for codec in ("trio_chat/core/protocol.py", "trio_chat/_protocol.py")
        for rule in (
            (codec, _PARSING, "parse"),
            (codec, _VALIDATING, "validate"),
            (codec, None, "encode"),  # encode, *_frame, to_wire, format_ts
        )
    ),
    ("json/decoder.py", None, "parse"),
    ("json/encoder.py", None, "encode"),
    ("wsproto/", None, "parse"),
    ("websockets/", None, "parse"),
    ("trio_websocket/", None, "parse"),
    *(
        rule
        for wire in ("trio_chat/server/_wire.py", "trio_chat/_wire.py")
        for rule in (
            (wire, frozenset({"text_frame", "_frame", "close_frame"}), "encode"),
            (wire, frozenset({"write_now", "send", "send_texts", "send_frames"}), "write"),
            (wire, None, "parse"),  # receive, the engines
        )
    ),
    ("trio_chat/server/_connection.py", None, "write"),  # the outbox and its writer
    ("trio_chat/_server.py", frozenset({"text_frame", "_serialize"}), "encode"),
    ("trio_chat/_server.py", frozenset({"_oversized"}), "validate"),
    ("trio_chat/_server.py", _SERVER_WRITES, "write"),
    ("trio_chat/server/_http.py", None, "write"),
    ("trio_chat/_http.py", None, "write"),
    ("trio/_socket.py", None, "write"),
    ("trio/_highlevel_socket.py", None, "write"),
    ("trio_chat/server/_store.py", None, "store (loop side)"),
    ("trio_chat/_store.py", None, "store (loop side)"),
    ("trio_chat/core/hub.py", None, "hub"),
    ("trio_chat/server/_server.py", None, "hub"),  # the shell's dispatch
    ("trio_chat/_server.py", None, "hub"),  # (all of it, before the session core)
    ("trio_chat/core/conversation.py", None, "hub"),
    ("trio_chat/_conversation.py", None, "hub"),
    ("trio_chat/core/ratelimit.py", None, "hub"),
    ("trio_chat/_ratelimit.py", None, "hub"),
    ("trio/", None, "scheduler"),
    ("outcome/", None, "scheduler"),
)
STAGES: Final = (
    "parse", "validate", "hub", "store (loop side)", "encode", "write", "scheduler", "other",
)  # fmt: skip
WRITER: Final = "commit (writer thread)"


def _frame_site(frame: str) -> tuple[str, str]:
    """``("path/file.py", "function")`` of one py-spy frame, ``"fn (path/file.py:12)"``."""
    name, _, where = frame.rpartition(" (")
    path = where.rsplit(":", 1)[0]
    return path.replace(os.sep, "/"), name.rsplit(".", 1)[-1]


def classify(stack: str) -> str:
    """The stage a sampled stack of the event-loop thread is charged to (py-spy's raw
    format: frames from the outermost, separated by ``;``)."""
    for frame in reversed(stack.split(";")):
        path, function = _frame_site(frame)
        for where, functions, stage in _RULES:
            if where in path and (functions is None or function in functions):
                return stage
    return "other"


def breakdown(raw: str, rate_hz: float, seconds: float, messages: float) -> dict[str, float]:
    """Microseconds per message of each stage (and of the writer thread), from py-spy's
    raw output with ``--threads`` (idle samples left out)."""
    spent: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread, _, frames = stack.partition(";")
        if thread.endswith("MainThread"):
            spent[classify(frames)] += int(count)
        elif "_write_batches" in frames:
            spent[WRITER] += int(count)
        else:
            spent["other threads"] += int(count)
    per_sample_us = 1e6 / rate_hz
    return {stage: n * per_sample_us / seconds / messages for stage, n in spent.items()}


def py_spy() -> str | None:
    """py-spy's executable: beside this interpreter, or on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


PROFILE_RATE: Final = 500  # samples a second


async def _profiled(
    target: Target, guests: int, duration: float, workers: int
) -> tuple[dict[str, float], float]:
    """``target`` under ``guests`` closed-loop connections, sampled for ``duration``
    seconds after a second of warm-up: (µs per message by stage, messages per second)."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("the profile needs py-spy: pip install py-spy")
    warm = 1.5
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.txt"
        async with serving(target, Path(tmp)) as (url, server):
            rate = 0.0

            async def load() -> None:
                nonlocal rate
                rate, _ = await closed_loop(url, target.dialect, guests, duration + 2 * warm,
                                            workers)  # fmt: skip

            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                await trio.sleep(warm)
                await trio.run_process(
                    [executable, "record", "--pid", str(server.pid), "--rate",
                     str(PROFILE_RATE), "--duration", str(round(duration)), "--format", "raw",
                     "--threads", "--nonblocking", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
        raw = out.read_text()
    return breakdown(raw, PROFILE_RATE, round(duration), rate), rate


async def scenario_profile(
    guests: int,
    duration: float,
    workers: int,
    steps: Steps,
    old_code: str = "",
    storage: Storage = FRESH_SQLITE,
) -> tuple[list[Figure], dict[str, Any]]:
    """The cost of a message in each stage, trio-chat (concierge off) beside the bare
    trio-websocket echo (and the server from ``old_code``), all under ``guests``
    closed-loop connections."""
    targets = {
        "trio-chat": Target("chat", "chat"),
        "bare trio-websocket echo": Target("trio-websocket", "echo"),
    }
    if old_code:
        targets["trio-chat (old code)"] = Target("chat", "chat", code=old_code)
    targets = dict(zip(targets, on_storage(list(targets.values()), storage), strict=True))
    steps.start("profile", len(targets))
    duration = max(1.0, duration)
    profiles: dict[str, Any] = {"guests": guests}
    loop: dict[str, float] = {}
    for name, target in targets.items():
        costs, rate = await _profiled(target, guests, duration, workers)
        profiles[name] = {"rate": rate, "us_per_message": costs}
        loop[name] = sum(v for k, v in costs.items() if k in STAGES)
        steps.advance(name)
    figures = [
        Figure(
            f"event-loop CPU per message ({guests} guests, sampled by py-spy)",
            loop["trio-chat"],
            loop["bare trio-websocket echo"],
            "µs",
            "lower",
            "",
            "bare trio-websocket echo, per round trip",
        )
    ]
    if old_code:
        figures.append(
            Figure(
                f"event-loop CPU per message ({guests} guests, sampled by py-spy): new code",
                loop["trio-chat"],
                loop["trio-chat (old code)"],
                "µs",
                "lower",
                "",
                "old code, same run",
            )
        )
    return figures, {"profile": profiles}
