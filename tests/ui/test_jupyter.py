"""The client in a real Jupyter kernel (asyncio), through Trio guest mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers import free_port, server_process

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow


def notebook(*cells: str) -> object:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    return nb


def outputs(cell: object) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"])  # type: ignore[index]


def test_a_client_runs_in_a_kernel_without_blocking_cells(tmp_path: Path) -> None:
    port = free_port()
    with server_process(tmp_path / "chat.db", port):
        nb = notebook(
            f"""
from trio_chat import ChatClient, TrioInJupyter
runner = TrioInJupyter.start()
client = runner.connect(ChatClient("ws://127.0.0.1:{port}/ws", name="Notebook guest"))
print("cell returned while", client.state)
""",
            """
stored = await runner.run(client.send, "What time is breakfast?")
print("acked seq", stored.seq)
""",
            """
# Plain calls from a cell run outside Trio: they must hand over, not fail or deadlock.
client.set_online(False)
print("offline:", await runner.run(client.wait_for_state, "offline"))
client.set_online(True)
print("back:", await runner.run(client.wait_for_state, "connected"))
""",
            """
await runner.run(client.wait_until, lambda: len(client.transcript) >= 2)
print([m.sender for m in client.transcript])
runner.stop()
await runner.done
print("stopped", client.state)
""",
        )
        executed = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    cells = executed.cells
    assert outputs(cells[0]).strip() == "cell returned while connecting"
    assert outputs(cells[1]).strip() == "acked seq 1"
    assert outputs(cells[2]).split() == ["offline:", "offline", "back:", "connected"]
    assert outputs(cells[3]).splitlines() == ["['guest', 'ai']", "stopped closed"]
