"""HAProxy in front of a cluster: the config (one text for the docs and the tests) and
a throwaway HAProxy for tests and the cluster soak.

:func:`haproxy_config` renders the configuration that ``docs/deployment.md`` quotes
(a test checks that the quoted text is what it renders), so the front the tests run
is the front the docs describe, only with faster health checks. :func:`haproxy_front`
runs it in the foreground (``-db``) on a free loopback port and kills it on exit.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ._processes import free_port

__all__ = ["Front", "haproxy_binary", "haproxy_config", "haproxy_front"]


def haproxy_binary() -> str | None:
    """Debian's ``haproxy`` (in ``/usr/sbin``, off a normal user's ``PATH``), if any."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    return found


def haproxy_config(
    nodes: Sequence[tuple[str, str]],
    *,
    bind: str = ":80",
    check_every: str = "2s",
    stats_socket: str = "/run/haproxy/admin.sock",
    send_proxy: bool = True,
) -> str:
    """HAProxy's configuration for ``nodes`` (``(name, "host:port")`` each).

    One port for every node, any node for any connection (no stickiness: a guest may
    resume on another node), WebSockets kept open by ``timeout tunnel``, and a node
    taken out of rotation when its ``/healthz`` stops answering 200 (a node that
    cannot reach PostgreSQL answers 503). ``on-marked-down shutdown-sessions`` closes
    the connections of a node marked down, so its clients reconnect to a node that
    can store their messages instead of collecting ``internal`` errors. With
    ``send_proxy`` every connection (health checks too) opens with a PROXY v2 header
    naming the client, for nodes run with ``--proxy-protocol``: their per-address
    limits then count guests, not the balancer.
    """
    proxy = " send-proxy-v2 check-send-proxy" if send_proxy else ""
    servers = "".join(f"    server {name} {address}\n" for name, address in nodes)
    return (
        "global\n"
        f"    stats socket {stats_socket} mode 600 level admin\n"
        "\n"
        "defaults\n"
        "    mode http\n"
        "    timeout connect 5s\n"
        "    timeout http-request 10s\n"
        "    timeout client 1h          # a WebSocket lives long: the nodes' heartbeats\n"
        "    timeout server 1h          # keep it busy well within these\n"
        "    timeout tunnel 1h          # after the Upgrade, the WebSocket's own timeout\n"
        "    retries 3\n"
        "    option redispatch          # a refused connection is retried on another node\n"
        "\n"
        "frontend chat\n"
        f"    bind {bind}\n"
        "    default_backend nodes\n"
        "\n"
        "backend nodes\n"
        "    balance leastconn\n"
        "    option httpchk GET /healthz\n"
        "    http-check expect status 200\n"
        f"    default-server check inter {check_every} fall 2 rise 2"
        f" on-marked-down shutdown-sessions{proxy}\n"
        f"{servers}"
    )


@dataclass
class Front:
    """A running HAProxy: its port, and its view of the nodes."""

    port: int
    stats_socket: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def command(self, line: str) -> str:
        """One command on HAProxy's stats socket (``show stat``, ``disable server …``)."""
        stream = await trio.open_unix_socket(str(self.stats_socket))
        async with stream:
            with trio.fail_after(5):
                await stream.send_all(line.encode() + b"\n")
                answer = b""
                while chunk := await stream.receive_some():
                    answer += chunk
        return answer.decode()

    async def server_states(self) -> dict[str, str]:
        """Each node's state as HAProxy's health checks see it (``UP``, ``DOWN``, …)."""
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        proxy, name, status = header.index("pxname"), header.index("svname"), header.index("status")
        states: dict[str, str] = {}
        for line in lines[1:]:
            fields = line.split(",")
            if (
                len(fields) > status
                and fields[proxy] == "nodes"
                and fields[name] not in ("FRONTEND", "BACKEND")
            ):
                states[fields[name]] = fields[status].split(" ")[0]
        return states

    async def wait_states(self, wanted: dict[str, str], within: float = 20.0) -> None:
        """Until HAProxy sees every node of ``wanted`` in its state (``UP``/``DOWN``)."""
        with trio.fail_after(within):
            while True:
                states = await self.server_states()
                if all(states.get(name) == state for name, state in wanted.items()):
                    return
                await trio.sleep(0.05)


@asynccontextmanager
async def haproxy_front(
    nodes: Sequence[tuple[str, int]], *, check_every: str = "200ms", send_proxy: bool = True
) -> AsyncIterator[Front]:
    """HAProxy on a free loopback port in front of ``nodes`` (``(name, port)`` on
    loopback), with :func:`haproxy_config`'s text and health checks every
    ``check_every`` (HAProxy counts a node UP until two checks failed). Raises
    ``RuntimeError`` if HAProxy is not installed or does not start."""
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("HAProxy is not installed (apt-get install haproxy)")
    with tempfile.TemporaryDirectory(prefix="trio-chat-haproxy-") as tmp:
        port = free_port()
        front = Front(port, Path(tmp) / "admin.sock")
        config = Path(tmp) / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                [(name, f"127.0.0.1:{node_port}") for name, node_port in nodes],
                bind=f"127.0.0.1:{port}",
                check_every=check_every,
                stats_socket=str(front.stats_socket),
                send_proxy=send_proxy,
            )
        )
        log = Path(tmp) / "haproxy.log"
        with log.open("wb") as log_file:
            proc = await trio.lowlevel.open_process(
                [binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            await _wait_started(front, proc, log)
            yield front
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _wait_started(front: Front, proc: trio.Process, log: Path) -> None:
    with trio.fail_after(20):
        while True:
            if proc.poll() is not None:
                said = await trio.Path(log).read_text(errors="replace")
                raise RuntimeError(f"haproxy exited: {said}")
            try:
                await front.server_states()
                return
            except OSError:
                await trio.sleep(0.05)
