"""The cluster soak: guests through HAProxy onto two nodes while a node is killed,
Redis restarts, its pub/sub connections are killed and PostgreSQL crashes."""

from __future__ import annotations

import pytest

from trio_chat._cli import _soak_faults, build_parser, main
from trio_chat.testing import Fault, soak_cluster

pytestmark = pytest.mark.slow


async def test_a_short_cluster_soak_through_every_cluster_fault_loses_and_doubles_nothing() -> None:
    report = await soak_cluster(16, 15.0, nodes=2, seed=5)
    assert report.front == "haproxy" and report.nodes == 2
    happened = [entry.split(" ")[0] for entry in report.faults_applied]
    assert sorted(set(happened)) == ["kill", "postgres", "pubsub", "redis"], happened
    assert happened.count("kill") == 2  # each node once, each started again
    assert report.sent > 100
    assert report.acknowledged == report.sent
    assert (report.lost, report.duplicated, report.out_of_order) == (0, 0, 0), report.notes
    assert report.acked_but_not_pushed == 0
    assert report.delivered > report.sent  # their own messages and the concierge's
    assert report.reconnects >= 8  # the killed nodes' guests came back through HAProxy
    assert report.healthy


def test_the_soak_cli_takes_a_cluster_a_database_and_a_bus() -> None:
    args = build_parser().parse_args(
        [
            "soak",
            "--cluster",
            "3",
            "--db",
            "postgresql://chat@db/chat",
            "--bus",
            "redis://bus:6379/0",
            "--front",
            "direct",
            "--faults",
            "kill@0.2:2,pubsub@0.5",
        ]
    )
    assert (args.cluster, args.db, args.bus, args.front) == (
        3,
        "postgresql://chat@db/chat",
        "redis://bus:6379/0",
        "direct",
    )
    assert _soak_faults(args) == [Fault("kill", 0.2, 2.0), Fault("pubsub", 0.5)]
    single = build_parser().parse_args(["soak", "--db", "/tmp/chat.db"])
    assert (single.cluster, single.db) == (None, "/tmp/chat.db")
    assert _soak_faults(single) is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["soak", "--cluster", "4"])


@pytest.mark.parametrize(
    "flags",
    [
        # Servers it did not start are never restarted.
        ["--cluster", "2", "--db", "postgresql://x@db/x", "--faults", "postgres@0.5"],
        ["--cluster", "2", "--bus", "redis://bus:6379/0", "--faults", "redis@0.5"],
        ["--cluster", "2", "--faults", "blackhole@0.5"],  # a single-node fault
        ["--cluster", "2", "--db", "chat.db"],  # a cluster needs PostgreSQL
        ["--bus", "redis://bus:6379/0"],  # a bus needs a cluster
    ],
)
def test_the_soak_cli_refuses_what_it_cannot_do_before_starting_anything(
    flags: list[str],
) -> None:
    assert main(["soak", *flags]) == 2
