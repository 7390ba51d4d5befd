"""Test sessions. ``nox`` alone runs every checking session; ``bench``, ``mutation``
and ``lab`` are long-running and only run when named (``nox -s bench``)."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "js", "lint", "typecheck", "notebooks"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The unit, end-to-end and durability tests."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"PYTHONFAULTHANDLER": "1"})


@nox.session(python=False)
def js(session: nox.Session) -> None:
    """The page's pure modules (protocol, backoff, transcript) with Node's own test
    runner: no npm package, no build step."""
    session.run("node", "--test", "tests/js/", external=True)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: style and common bugs; import-linter: the layers (pyproject.toml)."""
    session.install("ruff>=0.6", "import-linter>=2.1")
    session.run("ruff", "check", "trio_chat", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "trio_chat", "tests", "noxfile.py")
    session.run("lint-imports")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the tests."""
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy", "--strict", "trio_chat", "tests")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmarks at full size (minutes); results go to docs/benchmarks.md."""
    session.install("-e", ".[test]")
    args = session.posargs or [
        "all",
        "--duration",
        "5",
        "--out",
        "docs/benchmarks.json",
        "--plots",
        "docs/img",
    ]
    session.run(
        "trio-chat", "bench", *args, env={"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    )


@nox.session(python=PYTHON)
def mutation(session: nox.Session) -> None:
    """Mutation testing of the session core (mutmut; the hub and the status table
    against tests/core; settings in pyproject.toml).
    About two minutes; not part of plain ``nox``. Prints every surviving mutant.
    mutmut does not re-run a mutant when only the tests changed, so its cache goes
    first."""
    session.install("-e", ".[test]", "mutmut>=3.3")
    shutil.rmtree("mutants", ignore_errors=True)
    session.run("mutmut", "run", *session.posargs)
    session.run("mutmut", "results")


@nox.session(python=PYTHON)
def notebooks(session: nox.Session) -> None:
    """Execute every notebook headless in a real kernel, with small experiments; fail
    on any error or on a plot cell without an image."""
    session.install("-e", ".[test,notebooks]")
    session.run(
        "python", "tests/run_notebooks.py", *session.posargs, env={"TRIO_CHAT_NOTEBOOK_SMALL": "1"}
    )


@nox.session(python=PYTHON)
def lab(session: nox.Session) -> None:
    """Open JupyterLab on the notebooks (long-running; never part of plain ``nox``)."""
    session.install("-e", ".[notebooks]")
    session.run("jupyter", "lab", "notebooks/", *session.posargs)
