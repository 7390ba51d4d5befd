"""The benchmark harness at toy size: it must keep working; figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


# Every scenario at toy size, the peers' virtual environment installed on first use.
@pytest.mark.timeout(600)
def test_bench_runs_every_scenario_and_reports_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_chat",
            "bench",
            "all",
            "--guests",
            "6",
            "--duration",
            "1",
            "--json",
            "--rate",
            "50",
            "--rounds",
            "1",
            "--messages",
            "5",
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    figures = printed["figures"]
    names = [f["name"] for f in figures]
    # The generator's ceiling in each dialect, beside the fastest server of it.
    for dialect, fastest in (
        ("chat", "trio-chat"),
        ("echo", "echo"),
        ("socketio", "python-socketio 5 + uvicorn"),
    ):
        [ceiling] = [
            f
            for f in figures
            if f["name"].startswith(f"load generator ceiling, {dialect}")
            and "(6 guests)" in f["name"]
        ]
        assert fastest in ceiling["baseline_name"] and ceiling["target"] == ">= 2 x"
    compared = {
        (f["name"].split(": ", 1)[1], f["baseline_name"])
        for f in figures
        if f["name"].startswith("answered messages/s, 6 guests")
    }
    assert compared == {
        ("trio-chat, concierge off", "bare trio-websocket echo"),
        ("trio-chat, concierge off", "websockets (asyncio) echo"),
        ("trio-chat, concierge off", "python-socketio 5 + uvicorn"),
        ("trio-chat, concierge on", "trio-chat, concierge off"),
        ("python-socketio 5 + uvicorn", "bare trio-websocket echo"),
        # The frame engines, A/B.
        (
            "trio-chat, concierge off, frames decoded by websockets",
            "trio-chat, concierge off, frames decoded by wsproto",
        ),
    }
    assert any(n.startswith("answered messages/s, 24 guests") for n in names)  # 4 x crowd
    assert any(n.startswith("event-loop CPU per message (6 guests") for n in names)
    assert any("idle RSS" in n for n in names)
    cost = [f for f in figures if f["name"].startswith("instructions per message")]
    assert [f["baseline_name"] for f in cost] == ["bare trio-websocket echo", "concierge off"]
    steady = [f for f in figures if "(6 guests, 50 msg/s)" in f["name"]]
    assert (
        sorted(f["name"].split(" latency")[0] for f in steady)
        == ["ack"] * 3 + ["delivery to staff"] * 3
    )
    storm = [f for f in figures if f["name"].startswith("storm")]
    # No jitter, full jitter, full jitter with the first retry spread, server-spread
    # hints: time and peak each; only the last two are judged against the targets.
    assert len(storm) == 8
    assert [bool(f["target"]) for f in storm] == [False] * 4 + [True] * 4
    assert all(f["unit"] in ("s", "attempts") for f in storm)
    for figure in figures:
        if figure["name"].startswith("idle RSS"):
            # Six connections can fit in memory a process already holds: growth may be 0.
            assert figure["baseline"] >= 0 and figure["value"] >= 0
            continue
        assert figure["baseline"] > 0 and figure["value"] > 0, figure
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
        if figure["bounded"] and figure["target"]:
            assert figure["verdict"] == "bounded by the generator"
    written = json.loads(out.read_text())
    assert written["figures"] == figures
    # The series behind the plots: memory at each step, latency distributions, and
    # the attempts of each storm, 100 ms by 100 ms.
    series = written["series"]
    assert [n for n, _ in series["idle_rss"]["trio-chat"]] == [1, 3, 4, 6]
    assert len(series["throughput_rounds"]["trio-chat, concierge off, 6 guests"]) == 1
    # Every message the profile counted went through some stage of the server.
    profile = series["profile"]["trio-chat"]
    assert profile["rate"] > 0 and profile["us_per_message"]["hub"] > 0
    assert set(series["steady_latency_ms"]) == {
        "trio-chat ack",
        "trio-chat delivery to staff",
        "bare trio-websocket echo",
    }
    assert all(run["peak"] == max(run["attempts"]) for run in series["storm"].values())
    assert all(0 <= run["late_p99"] < 5 for run in series["storm"].values())
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "bench-idle.png",
        "bench-profile.png",
        "bench-steady.png",
        "bench-storm.png",
        "bench-throughput.png",
    ]
    # The saved results can be reported and drawn again without running anything.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_chat",
            "bench",
            "--from",
            str(out),
            "--json",
            "--plots",
            str(tmp_path / "again"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["figures"] == figures
    assert len(list((tmp_path / "again").iterdir())) == 5
