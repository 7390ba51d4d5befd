"""``bench --compare-with TREE`` must run TREE's server, wherever the bench is started:
``python -m`` puts the working directory first on the import path, and started from a
checkout it ran that checkout's code as "the old code" (an A/B of the code with
itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio_chat
from trio_chat.bench._peers import (
    BENCH_SERVER_FLAGS,
    bench_flags,
    code_env,
    missing_flags,
    tree_problem,
)

REPOSITORY = Path(trio_chat.__file__).resolve().parent.parent


def fake_tree(root: Path) -> Path:
    package = root / "trio_chat"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHO = 'the other tree'\n")
    (package / "__main__.py").write_text("from . import WHO\nprint(WHO)\n")
    return root


def test_the_other_tree_runs_even_from_inside_a_checkout(tmp_path: Path) -> None:
    other = fake_tree(tmp_path / "other")
    done = subprocess.run(
        [sys.executable, "-m", "trio_chat"],
        cwd=REPOSITORY,  # the checkout's own trio_chat sits in the working directory
        env={**os.environ, **code_env(str(other))},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "the other tree"
    assert tree_problem(str(other)) is None


def test_a_tree_without_the_package_is_refused(tmp_path: Path) -> None:
    problem = tree_problem(str(tmp_path))
    assert problem is not None and "no trio_chat package" in problem


def test_the_bench_refuses_a_tree_it_would_not_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trio_chat", "bench", "throughput", "--compare-with", str(tmp_path)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "no trio_chat package" in done.stderr


def test_an_earlier_server_gets_only_the_bench_flags_it_takes(tmp_path: Path) -> None:
    """A tree from before the limits took no flag to turn them off: its server starts
    without those flags instead of exiting on an unknown option."""
    other = fake_tree(tmp_path / "older")
    (other / "trio_chat" / "_cli.py").write_text(
        "import argparse\n"
        "serve = argparse.ArgumentParser(prog='trio-chat serve')\n"
        'serve.add_argument("--rate-limit")\n'
        'serve.add_argument("--heartbeat")\n'
    )
    flags = bench_flags(str(other))
    assert flags == ["--rate-limit", "0", "--heartbeat", "0"]
    assert "--typing-delay" in missing_flags(str(other))
    assert bench_flags("") == list(BENCH_SERVER_FLAGS)
    assert missing_flags(str(REPOSITORY)) == []
