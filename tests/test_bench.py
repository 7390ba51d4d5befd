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
            "--out",
            str(out),
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
    storm = [f for f in figures if f["name"].startswith("storm")]
    assert len(storm) == 6  # no jitter, full jitter, server-spread: time and peak each
    assert all(f["unit"] in ("s", "attempts") for f in storm)
    for figure in figures:
        assert figure["baseline"] > 0 and figure["value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
    assert json.loads(out.read_text())["figures"] == figures
