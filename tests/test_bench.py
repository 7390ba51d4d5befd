"""The benchmark harness at toy size: it must keep working; figures are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_runs_every_scenario_and_reports_ratios() -> None:
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
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["figures"]
    names = [f["name"] for f in figures]
    assert any("idle RSS" in n for n in names)
    assert any("acknowledged messages per second" in n for n in names)
    for figure in figures:
        assert figure["baseline"] > 0 and figure["value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
