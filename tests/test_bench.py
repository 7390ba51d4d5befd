"""The benchmark harness at toy size: it must keep working; figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


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
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    figures = printed["figures"]
    names = [f["name"] for f in figures]
    assert any("idle RSS" in n for n in names)
    assert any("concierge off)" in n and "vs" not in n for n in names)
    assert any("concierge on" in n for n in names)
    assert any("vs websockets echo" in n for n in names)
    assert any("(24 guests, concierge off)" in n for n in names)  # the saturating crowd
    steady = [f for f in figures if "(6 guests, 50 msg/s)" in f["name"]]
    assert (
        sorted(f["name"].split(" latency")[0] for f in steady)
        == ["ack"] * 3 + ["delivery to staff"] * 3
    )
    storm = [f for f in figures if f["name"].startswith("storm")]
    # No jitter, full jitter, full jitter with the first retry spread, server-spread
    # hints: time and peak each.
    assert len(storm) == 8
    assert all(f["unit"] in ("s", "attempts") for f in storm)
    for figure in figures:
        if figure["name"].startswith("idle RSS"):
            # Six connections can fit in memory a process already holds: growth may be 0.
            assert figure["baseline"] >= 0 and figure["value"] >= 0
            continue
        assert figure["baseline"] > 0 and figure["value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
    written = json.loads(out.read_text())
    assert written["figures"] == figures
    # The series behind the plots: memory at each step, latency distributions, and
    # the attempts of each storm, 100 ms by 100 ms.
    series = written["series"]
    assert [n for n, _ in series["idle_rss"]["trio-chat"]] == [1, 3, 4, 6]
    assert len(series["throughput_rounds"]["trio-chat, concierge off"]) == 1
    assert set(series["steady_latency_ms"]) == {
        "trio-chat ack",
        "trio-chat delivery to staff",
        "bare trio-websocket echo",
    }
    assert all(run["peak"] == max(run["attempts"]) for run in series["storm"].values())
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "bench-idle.png",
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
    assert len(list((tmp_path / "again").iterdir())) == 4
