"""``trio-chat bench --db URL`` and ``bench cluster``, on real PostgreSQL and Redis
servers (tests/services.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from trio_chat.bench import build_parser
from trio_chat.bench._peers import (
    Storage,
    Target,
    chat_server_args,
    chat_server_process,
    on_storage,
)
from trio_chat.bench._report import check_storage, cluster_sizes
from trio_chat.bench._scenarios import THROUGHPUT_TARGETS
from trio_chat.testing._services import RedisInstance

PG = "postgresql://chat@db.example/chat"
BUS = "redis://bus.example:6379/0"


def bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_chat", "bench", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------- bench --db


def test_bench_takes_a_database_url_and_a_bus_for_every_server_it_starts() -> None:
    args = build_parser().parse_args(["steady", "--db", PG, "--bus", BUS])
    assert (args.db, args.bus) == (PG, BUS) and check_storage(args) is None
    storage = Storage(args.db, args.bus)
    targets = on_storage(THROUGHPUT_TARGETS, storage)
    # Only trio-chat moves to PostgreSQL; the peers and the null server have no database.
    assert {t.storage for t in targets if t.kind == "chat"} == {storage}
    assert {t.storage for t in targets if t.kind != "chat"} == {Storage()}
    assert "on PostgreSQL + Redis" in Target("chat", "chat", storage=storage).label
    argv = chat_server_args(8765, storage.db_for(Path("/tmp")), bus=storage.bus)
    assert argv[argv.index("--db") + 1] == PG and argv[argv.index("--bus") + 1] == BUS
    # The restartable server of steady and storm: the URL is the last --db, which
    # argparse keeps.
    extra = chat_server_process(Path("/tmp/x.db"), storage=storage).extra
    assert list(extra[-4:]) == ["--db", PG, "--bus", BUS]
    # Without --db: a fresh SQLite file per server, as before.
    default = build_parser().parse_args(["throughput"])
    assert Storage(default.db, default.bus).db_for(Path("/w")) == "/w/bench.db"


def test_bench_refuses_a_bus_without_a_postgres_database() -> None:
    parser = build_parser()
    assert check_storage(parser.parse_args(["throughput", "--bus", BUS])) is not None
    assert check_storage(parser.parse_args(["steady", "--db", "x.db", "--bus", BUS])) is not None
    assert check_storage(parser.parse_args(["cluster", "--db", "x.db"])) is not None
    # bench cluster brings its own PostgreSQL when none is given.
    assert check_storage(parser.parse_args(["cluster", "--bus", BUS])) is None
    refused = bench("throughput", "--bus", BUS)
    assert refused.returncode == 2 and "--bus needs a postgresql://" in refused.stderr


def test_cluster_sizes_default_to_about_three_minutes_and_quick_is_small() -> None:
    parser = build_parser()
    full = cluster_sizes(parser.parse_args(["cluster"]))
    assert (full.guests, full.duration, full.rounds, full.recovery_guests) == (50, 3.0, 3, 1000)
    quick = cluster_sizes(parser.parse_args(["cluster", "--quick", "--recovery-guests", "30"]))
    assert quick.rounds == 1 and quick.guests < full.guests and quick.recovery_guests == 30


def test_bench_db_runs_the_server_on_postgres(pg_url: str) -> None:
    done = bench(
        "engines", "--db", pg_url, "--guests", "2", "--duration", "0.3", "--rounds", "1", "--json"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)["figures"]
    assert figures and all(f["value"] > 0 for f in figures)
    # Every guest of every run registered in PostgreSQL: 2 + 8 per engine.
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM guests").fetchone()
    assert row is not None and row[0] == 2 * (2 + 8)


# ------------------------------------------------------------------- bench cluster


def by_name(figures: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    return [f for f in figures if f["name"].startswith(start)]


def test_a_quick_cluster_run_measures_every_part_across_real_nodes(
    pg_url: str, redis_server: RedisInstance
) -> None:
    done = bench("cluster", "--quick", "--db", pg_url, "--bus", redis_server.url, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    figures, series = results["figures"], results["series"]
    expected = {
        "load generator ceiling, chat dialect": 2,  # one per crowd
        "acked messages/s, 10 guests: one node on PostgreSQL": 1,
        "acked messages/s, 40 guests: one node on PostgreSQL": 1,
        "acked messages/s, 40 guests split over the nodes: two nodes": 1,
        "ack latency p": 3,  # p50, p99, p99.9: two nodes beside one
        "delivery latency p": 3,
        "extra latency a cross-node delivery adds": 3,
        "recovery after kill -9 of a node (20 guests on it)": 3,
    }
    for start, count in expected.items():
        assert len(by_name(figures, start)) == count, (start, [f["name"] for f in figures])
    assert len(figures) == sum(expected.values())
    for f in figures:
        assert f["baseline"] > 0, f
        if not f["name"].startswith("extra latency"):
            assert f["value"] > 0, f
    # (The extra latency itself may come out below zero in a quick run: a Redis hop is
    # a fraction of a millisecond, within a few dozen samples' noise.)

    # The cross-node deliveries really crossed: the watcher was on the other node,
    # which had each message from the bus (the sender's node published it).
    for placement, runs in series["cluster_delivery_bus"].items():
        assert runs, placement
        for run in runs:
            sender, watcher = run["sender_node"], run["watcher_node"]
            assert run["resumed"] == 4  # each watcher is a second session of its guest
            if placement == "same node":
                assert sender["after"]["node"] == watcher["after"]["node"]
                continue
            assert sender["after"]["node"] != watcher["after"]["node"]
            published = sender["after"]["published"] - sender["before"]["published"]
            received = watcher["after"]["received"] - watcher["before"]["received"]
            assert published >= run["sent"] and received >= run["sent"], run

    (recovery,) = series["cluster_recovery"]
    assert recovery["guests"] == 20
    gaps = dict(recovery["gap_quantiles_s"])
    assert 0 < gaps[0.5] <= gaps[1.0] <= recovery["all_back_s"]
    assert set(series["cluster_rounds"]) >= {
        "one node on SQLite, 10 guests",
        "two nodes on PostgreSQL + Redis, 40 guests",
    }
