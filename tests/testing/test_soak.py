"""The soak run: a short one in the suite, through every fault kind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trio_chat.testing import Fault, parse_faults, soak

pytestmark = pytest.mark.slow


async def test_a_short_soak_through_every_fault_loses_and_doubles_nothing() -> None:
    report = await soak(24, 8.0, seed=3)
    assert sorted({f.split("@")[0] for f in report.faults}) == sorted(
        ["blackhole", "drop", "kill", "latency", "restart"]
    )
    assert report.sent > 100
    assert report.acknowledged == report.sent
    assert report.lost == 0 and report.duplicated == 0 and report.out_of_order == 0
    # Live pushes and history repairs are counted apart: faults made guests repair
    # some, and every message acknowledged on its first send was also pushed live.
    assert report.arrived_live + report.repaired == report.delivered
    assert report.arrived_live > report.sent  # their own messages and the concierge's
    assert report.repaired > 0
    assert report.acked_but_not_pushed == 0
    assert report.reconnects >= 24 * 3  # every guest lived through several outages
    assert report.recovery_s["max"] > 0
    assert report.peak_attempts_per_100ms >= 1
    assert report.healthy


def test_fault_specs_parse_or_say_what_is_wrong() -> None:
    assert parse_faults("drop@0.5,blackhole@0.2:3") == [
        Fault("blackhole", 0.2, 3.0),
        Fault("drop", 0.5),
    ]
    assert parse_faults("none") == []
    for bad in ("quake@0.5", "drop@later", "drop@1.5"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_the_cli_prints_one_json_object_and_exits_zero_when_healthy() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_chat",
            "soak",
            "--guests",
            "6",
            "--duration",
            "3",
            "--faults",
            "drop@0.3,restart@0.6",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in (
        "sent",
        "acknowledged",
        "delivered",
        "lost",
        "duplicated",
        "out_of_order",
        "reconnects",
        "arrived_live",
        "repaired",
        "acked_but_not_pushed",
        "recovery_s",
        "peak_attempts_per_100ms",
    ):
        assert key in report
    assert set(report["recovery_s"]) == {"p50", "p99", "max"}
    assert report["lost"] == 0 and report["sent"] == report["acknowledged"] > 0
