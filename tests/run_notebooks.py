"""Execute every notebook headless in a real kernel; fail on any error, and on any
cell tagged ``plot`` that produced no image. Executed copies go to
test-artifacts/notebooks/ (the committed notebooks stay without outputs).

Usage: python tests/run_notebooks.py [NOTEBOOK ...]   (default: notebooks/*.ipynb)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-artifacts" / "notebooks"


def check(path: Path) -> list[str]:
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    problems = [
        f"{path.name}: committed with outputs"
        for cell in notebook.cells
        if cell.cell_type == "code" and cell.get("outputs")
    ][:1]
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    started = time.monotonic()
    try:
        client.execute()
    except CellExecutionError as exc:
        problems.append(f"{path.name}: a cell failed:\n{exc}")
    finally:
        OUT.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, OUT / path.name)  # type: ignore[no-untyped-call]
    for index, cell in enumerate(notebook.cells):
        if "plot" in cell.get("metadata", {}).get("tags", []):
            images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            if not images:
                problems.append(f"{path.name}: plot cell {index} produced no image")
    print(
        f"{path.name}: {'ok' if not problems else 'FAILED'} in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    return problems


def main(argv: list[str]) -> int:
    os.environ.setdefault("TRIO_CHAT_NOTEBOOK_SMALL", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    problems = [p for path in paths for p in check(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(
        f"{len(paths) - len({p.split(':')[0] for p in problems})} passed, "
        f"{len({p.split(':')[0] for p in problems})} failed"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
