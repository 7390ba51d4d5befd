"""The ``trio-chat`` command line."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio
from rich.console import Console
from rich.markup import escape

from ._version import __version__
from .core.errors import StorageError
from .server._admin import add_guest, add_staff, opened, revoke_staff, rotate_secret, staff_token
from .server._backends import describe_db, init_db
from .server._concierge import RulesResponder
from .server._llm import DEFAULT_SYSTEM_PROMPT, LlmSettings
from .server._secrets import SECRET_FILE_ENV
from .server._server import GC_THRESHOLDS, ChatServer, ServerConfig
from .server._staff_console import DEFAULT_PUBLIC_URL, sign_in_link
from .server._tls import server_ssl_context
from .server._wire import DEFAULT_ENGINE, ENGINES

if TYPE_CHECKING:
    from .testing import Fault

DEFAULT_DB = "trio-chat.db"

err_console = Console(stderr=True)


def _cluster_size(value: str) -> int:
    if value not in ("2", "3"):
        raise argparse.ArgumentTypeError("a soak cluster has 2 or 3 nodes")
    return int(value)


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return number


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _add_db_argument(parser: argparse.ArgumentParser) -> None:
    """``--db``, the same for every command: a SQLite file or a PostgreSQL URL (what it
    names is decided in one place, ``server._backends.open_backend``)."""
    parser.add_argument(
        "--db",
        default=DEFAULT_DB,
        metavar="PATH|URL",
        help="SQLite file (created if missing), or postgresql://user@host/db for a cluster",
    )


def _secret_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        default=os.environ.get(SECRET_FILE_ENV) or None,
        metavar="PATH",
        help=f"the token secret's own file, created 0600 if missing (default: ${SECRET_FILE_ENV}, "
        "else the secret in the database)",
    )


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-chat", description="Live guest chat for hotels, on Trio."
    )
    parser.add_argument("--version", action="version", version=f"trio-chat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the chat server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    _add_db_argument(serve)
    serve.add_argument("--hello-timeout", type=_positive, default=10.0, metavar="SECONDS")
    serve.add_argument(
        "--heartbeat",
        type=_non_negative,
        default=20.0,
        metavar="SECONDS",
        help="WebSocket ping interval (0 = off)",
    )
    serve.add_argument(
        "--concierge",
        choices=["rules", "llm", "off"],
        default="rules",
        help="who answers guests first: the rules over the knowledge base, a language "
        "model (--llm-url, --llm-model), or nobody (staff only)",
    )
    llm = serve.add_argument_group(
        "language-model concierge (--concierge llm)",
        "Any OpenAI-compatible chat completions endpoint. The API key is read from the "
        "environment variable named by --llm-api-key-env, never from a flag.",
    )
    llm.add_argument(
        "--llm-url", metavar="URL", help="the API's base URL, e.g. http://127.0.0.1:11434/v1"
    )
    llm.add_argument("--llm-model", metavar="NAME")
    llm.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", metavar="VARIABLE")
    llm.add_argument(
        "--llm-system-prompt", metavar="FILE", help="the hotel's own prompt ({hotel}, {knowledge})"
    )
    llm.add_argument("--llm-max-tokens", type=int, default=300, metavar="N")
    llm.add_argument("--llm-first-token-timeout", type=_positive, default=10.0, metavar="SECONDS")
    llm.add_argument("--llm-timeout", type=_positive, default=25.0, metavar="SECONDS")
    llm.add_argument(
        "--llm-guest-per-minute", type=_non_negative, default=6.0, metavar="N", help="0 = no limit"
    )
    llm.add_argument(
        "--llm-per-minute", type=_non_negative, default=120.0, metavar="N", help="0 = no limit"
    )
    serve.add_argument(
        "--rate-limit",
        type=_non_negative,
        default=10.0,
        metavar="PER_SECOND",
        help="tokens per second per guest or staff member, all tabs together; a message "
        "costs 1, typing/read/ping 0.1, history 4 (0 = off)",
    )
    # -- memory and rate limits (docs/security.md) --
    serve.add_argument(
        "--rate-burst", type=int, default=20, metavar="TOKENS", help="burst per guest or staff"
    )
    serve.add_argument(
        "--rate-limit-per-ip",
        type=_non_negative,
        default=300.0,
        metavar="PER_SECOND",
        help="tokens per second shared by all sessions from one address; size it for a "
        "hotel behind one NAT address (0 = off)",
    )
    serve.add_argument(
        "--rate-burst-per-ip", type=int, default=3000, metavar="TOKENS", help="burst per address"
    )
    serve.add_argument(
        "--outbox-limit-bytes",
        type=int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="bytes one connection may leave unread before it is cut off with 1013",
    )
    serve.add_argument(
        "--no-open-registration",
        action="store_true",
        help="refuse hello without a token (issue tokens with 'guest add')",
    )
    serve.add_argument(
        "--typing-delay", type=_non_negative, default=0.3, metavar="SECONDS", help=argparse.SUPPRESS
    )
    serve.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite durability: FULL survives power loss, NORMAL a crash",
    )
    serve.add_argument(
        "--frame-engine",
        choices=sorted(ENGINES),
        default=DEFAULT_ENGINE,
        help="what decodes incoming WebSocket frames (see docs/benchmarks.md)",
    )
    # Staff hardening: revocation, secrets and tokens (docs/security.md).
    _secret_file_option(serve)
    serve.add_argument(
        "--guest-token-idle-days",
        type=_non_negative,
        default=30.0,
        metavar="DAYS",
        help="a guest token unused (no sign-in, no message) this long expires (0 = never)",
    )
    serve.add_argument(
        "--revocation-poll",
        type=_non_negative,
        default=0.5,
        metavar="SECONDS",
        help="how often to look for removed or revoked staff and a new secret (0 = never)",
    )
    # http hardening: admission and abuse limits (each has an "off": 0)
    serve.add_argument(
        "--max-connections",
        type=_count,
        default=None,
        metavar="N",
        help="open connections in all (default: the open-file limit less 64; 0 = off)",
    )
    serve.add_argument(
        "--max-connections-per-ip",
        type=_count,
        default=500,
        metavar="N",
        help="open connections from one address (default 500; 0 = off)",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web page origin that may open WebSockets, e.g. https://chat.hotel.example "
        "(repeatable; the server's own origin always may; none given: loopback pages too)",
    )
    serve.add_argument(
        "--registrations-per-minute",
        type=_non_negative,
        default=30.0,
        metavar="N",
        help="new guests per address, with bursts of 60 (default 30; 0 = off)",
    )
    serve.add_argument(
        "--expire-silent-guests",
        type=_non_negative,
        default=7 * 86400.0,
        metavar="SECONDS",
        help="forget guests who never wrote after this long (default 7 days; 0 = never)",
    )
    # TLS (hardening: tls)
    serve.add_argument(
        "--certfile",
        metavar="PATH",
        help="serve https:// and wss:// with this certificate chain (PEM)",
    )
    serve.add_argument(
        "--keyfile",
        metavar="PATH",
        help="the certificate's private key (PEM; default: in --certfile)",
    )
    serve.add_argument(
        "--tls-handshake-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose TLS handshake is not done by then",
    )
    serve.add_argument("-v", "--verbose", action="store_true")
    # -- scale-out ----------------------------------------------------------------------
    serve.add_argument(
        "--bus",
        default=None,
        metavar="URL",
        help="redis://host:port/0: run as one node of a cluster (needs a postgresql:// --db)",
    )
    serve.add_argument(
        "--poll-interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="while the bus is unreachable, read the database this often",
    )
    serve.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="behind a load balancer: every connection opens with a PROXY header "
        "(HAProxy's send-proxy / send-proxy-v2) naming the client, whose address the "
        "per-address limits count; connections without one are closed. Only the "
        "balancer may reach the port",
    )
    # -- reply lease (the concierge's owed replies in a cluster) --
    serve.add_argument(
        "--reply-lease",
        type=_non_negative,
        default=10.0,
        metavar="SECONDS",
        help="cluster: how long a node's claim to answer a guest message lasts without "
        "renewal; another node answers once it lapses (0: only the start-up recovery)",
    )

    staff = commands.add_parser("staff", help="manage staff members and their tokens")
    staff_commands = staff.add_subparsers(dest="staff_command", required=True, metavar="ACTION")
    add = staff_commands.add_parser("add", help="add a staff member and print their token")
    add.add_argument("name")
    _add_db_argument(add)
    # The staff console's sign-in link (the token stays alone on the last line).
    add.add_argument("--url", default=DEFAULT_PUBLIC_URL, help="the server's public address")
    link = staff_commands.add_parser(
        "link", help="print a staff member's sign-in link for the browser console"
    )
    link.add_argument("name")
    _add_db_argument(link)
    link.add_argument("--url", default=DEFAULT_PUBLIC_URL, help="the server's public address")
    listing = staff_commands.add_parser("list", help="list staff members")
    _add_db_argument(listing)
    remove = staff_commands.add_parser("remove", help="remove a staff member (by name or id)")
    remove.add_argument("name")
    _add_db_argument(remove)
    token = staff_commands.add_parser("token", help="print an existing staff member's token")
    token.add_argument("name")
    _add_db_argument(token)
    revoke = staff_commands.add_parser(
        "revoke",
        help="invalidate a staff member's tokens (closing their open consoles) and print a new one",
    )
    revoke.add_argument("name")
    _add_db_argument(revoke)
    for command in (add, token, revoke):
        _secret_file_option(command)

    secret = commands.add_parser("secret", help="the token secret")
    secret_commands = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    rotate = secret_commands.add_parser(
        "rotate", help="replace the token secret: EVERY staff and guest token stops working"
    )
    _add_db_argument(rotate)
    rotate.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _secret_file_option(rotate)

    from .bench import build_parser as build_bench_parser

    build_bench_parser(
        commands.add_parser("bench", help="benchmarks, each beside a bare trio-websocket baseline")
    )

    soak = commands.add_parser(
        "soak", help="many guests through scheduled faults; report what was lost or doubled"
    )
    soak.add_argument("--guests", type=int, default=50)
    soak.add_argument("--duration", type=_positive, default=30.0, metavar="SECONDS")
    soak.add_argument(
        "--faults",
        default=None,
        metavar="SPEC",
        help="kind@fraction[:seconds],... with kinds drop, blackhole, latency, "
        "restart, kill (default: every kind, spread over the run; 'none')",
    )
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--rate", type=_positive, default=1.0, help="messages per second per guest")
    soak.add_argument("--json", action="store_true", help="one JSON object on stdout")
    # Scale-out: the soak on a cluster, and on a given database.
    soak.add_argument(
        "--cluster",
        type=_cluster_size,
        default=None,
        metavar="N",
        help="N nodes (2 or 3) on one PostgreSQL and one Redis; faults: kill, pubsub, "
        "redis, postgres",
    )
    soak.add_argument(
        "--db",
        default=None,
        metavar="PATH|URL",
        help="the server's SQLite file or postgresql:// URL (--cluster: a URL; default: "
        "a throwaway one)",
    )
    soak.add_argument(
        "--bus", default=None, metavar="URL", help="--cluster: redis:// (default: a throwaway one)"
    )
    soak.add_argument(
        "--front",
        choices=("haproxy", "direct"),
        default=None,
        help="--cluster: guests through HAProxy on one port (default when installed) or "
        "straight to each node",
    )

    proxy = commands.add_parser("proxy", help="a fault-injecting TCP proxy (loopback)")
    proxy.add_argument("--listen", type=int, required=True, metavar="PORT")
    proxy.add_argument("--upstream", required=True, metavar="HOST:PORT")
    proxy.add_argument(
        "--schedule",
        default="",
        metavar="SPEC",
        help="kind@seconds[:duration],... with kinds drop, blackhole, latency, "
        "refuse, bandwidth (e.g. 'drop@10,blackhole@20:5')",
    )

    chat = commands.add_parser("chat", help="chat from this terminal (as a guest, or --staff)")
    chat.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/ws")
    chat.add_argument("--token", help="come back as this guest")
    chat.add_argument("--name", help="your name, shown to staff")
    chat.add_argument("--staff", metavar="TOKEN", help="chat as staff, with this staff token")
    chat.add_argument(
        "--cafile",
        metavar="PATH",
        help="trust the CA certificates in this PEM file for wss:// (default: the system's)",
    )

    mock = commands.add_parser(
        "mock",
        help="the guest page against the mock server: memory only, a scripted staff member, "
        "faults typed at its prompt",
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8765)
    mock.add_argument(
        "--concierge",
        choices=["rules", "script"],
        default="rules",
        help="the rules concierge (as trio-chat serve), or the mock's few canned replies",
    )
    mock.add_argument(
        "--staff-delay",
        type=_non_negative,
        default=3.0,
        metavar="SECONDS",
        help="how long the scripted staff member takes to claim a hand-off",
    )
    mock.add_argument("--staff-name", default="Sam")

    # -- scale-out: the database's schema --------------------------------------------
    db = commands.add_parser("db", help="the database's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_init = db_commands.add_parser(
        "init", help="create or migrate the schema (idempotent; serve also does it)"
    )
    _add_db_argument(db_init)

    guest = commands.add_parser("guest", help="issue guest tokens")
    guest_commands = guest.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    guest_add = guest_commands.add_parser("add", help="create a guest and print their token")
    guest_add.add_argument("name")
    _add_db_argument(guest_add)
    _secret_file_option(guest_add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "staff": _staff,
        "secret": _secret,
        "guest": _guest,
        "db": _db,
        "bench": _bench,
        "chat": _chat,
        "soak": _soak,
        "proxy": _proxy,
        "mock": _mock,
    }
    try:
        try:
            return handlers[args.command](args)
        except BaseExceptionGroup as group:
            # Trio's nurseries wrap errors; a group with one cause is that cause.
            raise _sole_cause(group) from None
    except StorageError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2
    except OSError as exc:
        if args.command == "serve":
            err_console.print(f"[red]error:[/red] cannot listen on {args.host}:{args.port}: {exc}")
        else:
            err_console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


def _sole_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.keyfile is not None and args.certfile is None:
        err_console.print("[red]error:[/red] --keyfile needs --certfile")
        return 2
    tls: ssl.SSLContext | None = None
    if args.certfile is not None:
        try:
            tls = server_ssl_context(args.certfile, args.keyfile)
        except OSError as exc:  # ssl.SSLError included
            err_console.print(
                "[red]error:[/red] cannot use the certificate "
                f"{escape(args.certfile)}: {escape(str(exc))}"
            )
            return 2
    config = ServerConfig(
        db_path=args.db,
        host=args.host,
        port=args.port,
        hello_timeout=args.hello_timeout,
        heartbeat=args.heartbeat,
        concierge=args.concierge,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        rate_limit_per_ip=args.rate_limit_per_ip,
        rate_burst_per_ip=args.rate_burst_per_ip,
        outbox_limit_bytes=args.outbox_limit_bytes,
        open_registration=not args.no_open_registration,
        typing_delay=args.typing_delay,
        synchronous=args.synchronous,
        frame_engine=args.frame_engine,
        secret_file=args.secret_file,
        guest_token_idle_days=args.guest_token_idle_days,
        revocation_poll=args.revocation_poll,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        allowed_origins=tuple(args.allowed_origin),
        registrations_per_minute=args.registrations_per_minute,
        expire_silent_guests=args.expire_silent_guests,
        ssl_context=tls,
        tls_handshake_timeout=args.tls_handshake_timeout,
        llm=_llm_settings(args),
        bus=args.bus,
        poll_interval=args.poll_interval,
        proxy_protocol=args.proxy_protocol,
        reply_lease=args.reply_lease,
    )
    # The process is ours, so is its collector policy. With thousands of connections
    # alive, CPython's default thresholds ran full collections of 60-200 ms at 500
    # messages/s, and every ack waited behind them (p99 80-300 ms instead of 6-9 ms in
    # the steady-load benchmark). Young collections every 50,000 allocations and older
    # ones far more rarely keep the pauses short; reference counting still frees all
    # garbage that is not a cycle at once.
    gc.set_threshold(*GC_THRESHOLDS)
    trio.run(_run_server, config, describe_db(config.db_path))
    return 0


def _llm_settings(args: argparse.Namespace) -> LlmSettings | None:
    if args.concierge != "llm":
        return None
    if not args.llm_url or not args.llm_model:
        raise SystemExit("--concierge llm needs --llm-url and --llm-model")
    prompt = DEFAULT_SYSTEM_PROMPT
    if args.llm_system_prompt:
        try:
            prompt = LlmSettings.read_prompt(args.llm_system_prompt)
        except OSError as exc:
            raise SystemExit(f"cannot read {args.llm_system_prompt}: {exc.strerror}") from None
    return LlmSettings(
        url=args.llm_url,
        model=args.llm_model,
        api_key=os.environ.get(args.llm_api_key_env) or None,
        system_prompt=prompt,
        max_tokens=args.llm_max_tokens,
        first_token_timeout=args.llm_first_token_timeout,
        answer_timeout=args.llm_timeout,
        guest_per_minute=args.llm_guest_per_minute,
        global_per_minute=args.llm_per_minute,
    )


MOCK_FAULTS: Final = {
    "drop": "drop every connection without a close frame",
    "close": "close every connection (1001)",
    "restart": "send every client a reconnect hint of 3 s, then close (1012)",
    "refuse": "refuse new connections (1013)",
    "accept": "accept new connections again",
    "slow-acks": "hold every ack for 5 s",
    "no-acks": "store messages but withhold their acks",
    "acks": "acknowledge at once again",
}


def _mock(args: argparse.Namespace) -> int:
    trio.run(_run_mock, args)
    return 0


async def _run_mock(args: argparse.Namespace) -> None:
    from .testing import MockServer

    console = Console()
    mock = MockServer(
        concierge=RulesResponder() if args.concierge == "rules" else None,
        staff_name=args.staff_name,
        staff_delay=args.staff_delay,
        staff_greeting=f"Hi, {args.staff_name} from the front desk here. How can I help?",
        host=args.host,
        port=args.port,
        typing_delay=0.3,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock.run)
        host = args.host if ":" not in args.host else f"[{args.host}]"
        console.print(f"[bold yellow]trio-chat mock[/bold yellow] {__version__}: memory only")
        console.print(f"  chat page   http://{host}:{port}/")
        console.print(f"  websocket   ws://{host}:{port}/ws")
        console.print(
            f"  {args.staff_name} claims every hand-off after {args.staff_delay:g} s. "
            "Faults, typed here: " + ", ".join(MOCK_FAULTS) + ". Ctrl-C stops.",
            style="dim",
        )
        nursery.start_soon(_mock_faults, mock, console)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _mock_faults(mock: Any, console: Console) -> None:
    """Faults on demand: one word a line on standard input."""

    def acks_at_once() -> None:
        mock.delay_acks(0)
        mock.withhold_acks(False)

    actions: dict[str, Callable[[], None]] = {
        "drop": mock.drop_all,
        "close": mock.close_all,
        "restart": lambda: mock.send_reconnect(3000),
        "refuse": lambda: mock.refuse(True),
        "accept": lambda: mock.refuse(False),
        "slow-acks": lambda: mock.delay_acks(5),
        "no-acks": lambda: mock.withhold_acks(True),
        "acks": acks_at_once,
    }
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return  # no terminal: faults only from Python
        word = line.strip()
        if word in actions:
            actions[word]()
            console.print(f"  {word}: {MOCK_FAULTS[word]}", style="yellow")
        elif word:
            console.print("  faults: " + ", ".join(MOCK_FAULTS), style="dim")


async def _run_server(config: ServerConfig, data_path: str) -> None:
    console = Console()
    server = ChatServer(config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        host = config.host if ":" not in config.host else f"[{config.host}]"
        secure = "s" if config.ssl_context is not None else ""
        console.print(f"[bold green]trio-chat {__version__}[/bold green] is serving")
        console.print(f"  chat page   http{secure}://{host}:{port}/")
        console.print(f"  websocket   ws{secure}://{host}:{port}/ws")
        console.print(f"  health      http{secure}://{host}:{port}/healthz")
        console.print(f"  data        {data_path}")
        console.print(
            f"  concierge   {config.concierge}   rate limit "
            f"{config.rate_limit or 'off'}   registration "
            f"{'open' if config.open_registration else 'closed'}"
        )
        console.print("  Ctrl-C stops gracefully; press it twice to stop at once.", style="dim")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if server.shutting_down:
                    nursery.cancel_scope.cancel()
                    break
                console.print("shutting down: telling clients to reconnect later...")
                server.shutdown()
                nursery.start_soon(_stop_when_done, server, nursery.cancel_scope)
    console.print("stopped.")


async def _stop_when_done(server: ChatServer, scope: trio.CancelScope) -> None:
    await server.wait_stopped()
    scope.cancel()


def _soak(args: argparse.Namespace) -> int:
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .testing import soak, soak_cluster

    try:
        faults = _soak_faults(args)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2
    with Progress(
        TextColumn("[bold]soak[/bold] {task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=args.duration)

        def show(status: dict[str, Any]) -> None:
            states = " ".join(f"{k} {v}" for k, v in sorted(status["states"].items()))
            bar.update(
                task,
                completed=min(status["elapsed"], status["duration"]),
                description=f"sent {status['sent']} acked {status['acknowledged']} | {states}",
            )

        common: dict[str, Any] = {
            "faults": faults,
            "seed": args.seed,
            "rate": args.rate,
            "progress": show,
            "db": args.db,
        }
        if args.cluster:
            report = trio.run(
                lambda: soak_cluster(
                    args.guests,
                    args.duration,
                    nodes=args.cluster,
                    bus=args.bus,
                    front=args.front,
                    **common,
                )
            )
        else:
            report = trio.run(lambda: soak(args.guests, args.duration, **common))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        from rich.table import Table

        where = f", {args.cluster} nodes ({report.front})" if args.cluster else ""
        table = Table(title=f"soak: {args.guests} guests, {args.duration:g} s{where}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in report.to_json().items():
            if isinstance(value, int):  # the counts; recovery times follow
                table.add_row(key, str(value))
        for key, value in report.recovery_s.items():
            table.add_row(f"recovery {key} (s)", f"{value:.3f}")
        Console().print(table)
        for fault in report.faults_applied:
            err_console.print(f"  fault: {fault}")
        for note in report.notes[:20]:
            err_console.print(f"  {note}", style="dim")
    return 0 if report.healthy else 1


def _soak_faults(args: argparse.Namespace) -> list[Fault] | None:
    """The soak's faults from the flags (``None``: the default schedule). Raises
    ``ValueError`` for a bad combination of flags or a fault it cannot carry out."""
    from .testing._soak import (
        CLUSTER_FAULT_KINDS,
        FAULT_KINDS,
        check_cluster_faults,
        parse_faults,
    )

    if not args.cluster:
        if args.bus is not None or args.front is not None:
            raise ValueError("--bus and --front need --cluster")
        return None if args.faults is None else parse_faults(args.faults, FAULT_KINDS)
    if args.db is not None and not args.db.startswith(("postgresql://", "postgres://")):
        raise ValueError("--cluster needs a postgresql:// URL for --db")
    if args.bus is not None and not args.bus.startswith(("redis://", "rediss://")):
        raise ValueError("--bus takes a redis:// URL")
    if args.faults is None:
        return None
    return check_cluster_faults(
        parse_faults(args.faults, CLUSTER_FAULT_KINDS),
        own_database=args.db is None,
        own_bus=args.bus is None,
    )


def _proxy(args: argparse.Namespace) -> int:
    from .testing import FaultProxy

    host, _, port = args.upstream.rpartition(":")
    try:
        schedule = _proxy_schedule(args.schedule)
        upstream_port = int(port)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2

    async def run() -> None:
        proxy = FaultProxy(
            upstream_port, upstream_host=host or "127.0.0.1", listen_port=args.listen
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            err_console.print(f"proxy 127.0.0.1:{proxy.port} -> {host}:{upstream_port}")
            if schedule:
                await proxy.run_schedule(schedule)

    trio.run(run)
    return 0


def _proxy_schedule(spec: str) -> list[tuple[float, str, tuple[Any, ...]]]:
    """``kind@seconds[:duration]`` entries as FaultProxy.run_schedule steps."""
    steps: list[tuple[float, str, tuple[Any, ...]]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, when = part.partition("@")
        at_text, _, length_text = when.partition(":")
        at, length = float(at_text), float(length_text or 0)
        if kind == "drop":
            steps.append((at, "reset_all", ()))
        elif kind in ("blackhole", "refuse"):
            steps += [(at, kind, (True,)), (at + (length or 5), kind, (False,))]
        elif kind == "latency":
            steps += [(at, "add_latency", (0.2, 0.1)), (at + (length or 5), "add_latency", (0,))]
        elif kind == "bandwidth":
            steps += [
                (at, "cap_bandwidth", (10_000,)),
                (at + (length or 5), "cap_bandwidth", (None,)),
            ]
        else:
            raise ValueError(f"unknown proxy fault {kind!r} in {part!r}")
    return steps


def _chat(args: argparse.Namespace) -> int:
    from .ui._terminal import main as terminal_main

    tls = None
    if args.cafile is not None:
        try:
            tls = ssl.create_default_context(cafile=args.cafile)
        except OSError as exc:  # ssl.SSLError included
            err_console.print(
                f"[red]error:[/red] cannot read {escape(args.cafile)}: {escape(str(exc))}"
            )
            return 2
    return trio.run(terminal_main, args.url, args.token, args.name, args.staff, tls)


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    return bench_command(args)


def _staff(args: argparse.Namespace) -> int:
    with opened(args.db) as db:
        if args.staff_command == "add":
            try:
                sign_in_link(args.url, "")  # a bad --url adds nobody
                member, token = add_staff(db, args.name, args.secret_file)
            except ValueError as exc:
                err_console.print(f"[red]error:[/red] {exc}")
                return 1
            err_console.print(
                f"added staff member {member.name} ({member.staff_id}); "
                "sign-in link (keep it private), then the token:"
            )
            print(sign_in_link(args.url, token))
            print(token)
        elif args.staff_command == "list":
            members = db.list_staff()
            if not members:
                err_console.print("no staff members yet: add one with 'trio-chat staff add NAME'")
            for member in members:
                print(f"{member.staff_id}\t{member.name}")
        elif args.staff_command == "remove":
            if not db.remove_staff(args.name):
                err_console.print(f"[red]error:[/red] no staff member {args.name!r}")
                return 1
            err_console.print(
                f"removed {args.name}; their tokens no longer work, a running server closes "
                "their consoles and hands their conversations back to the queue"
            )
        elif args.staff_command == "link":
            found = [m for m in db.list_staff() if args.name in (m.name, m.staff_id)]
            if not found:
                err_console.print(f"[red]error:[/red] no staff member {args.name!r}")
                return 1
            try:
                print(sign_in_link(args.url, staff_token(db, found[0])))
            except ValueError as exc:
                err_console.print(f"[red]error:[/red] {exc}")
                return 1
        elif args.staff_command == "token":
            found = [m for m in db.list_staff() if args.name in (m.name, m.staff_id)]
            if not found:
                err_console.print(f"[red]error:[/red] no staff member {args.name!r}")
                return 1
            print(staff_token(db, found[0], args.secret_file))
        elif args.staff_command == "revoke":
            revoked = revoke_staff(db, args.name, args.secret_file)
            if revoked is None:
                err_console.print(f"[red]error:[/red] no staff member {args.name!r}")
                return 1
            member, token = revoked
            err_console.print(
                f"revoked every earlier token of {member.name}; their open consoles close. "
                "New token:"
            )
            print(token)
        return 0


def _db(args: argparse.Namespace) -> int:
    err_console.print(init_db(args.db))
    return 0


ROTATE_WARNING: Final = """\
Rotating the token secret signs EVERYONE out, at once:
  * every staff token stops working: print each member's new one with
    'trio-chat staff token NAME' and hand it over;
  * every guest token stops working: guests lose access to their conversations
    (the history stays in the database, but no link reaches it any more); guests
    who come back start a new conversation;
  * a running server closes every connection signed in with an old token (4401).
If the server uses --secret-file, pass the same --secret-file here."""


def _secret(args: argparse.Namespace) -> int:
    err_console.print(ROTATE_WARNING, style="yellow", highlight=False)
    if not args.yes:
        if not sys.stdin.isatty():
            err_console.print("[red]error:[/red] not rotated: pass --yes to confirm")
            return 1
        answer = input("Type 'rotate' to go ahead: ")
        if answer.strip() != "rotate":
            err_console.print("not rotated")
            return 1
    with opened(args.db) as db:
        rotate_secret(db, args.secret_file)
    err_console.print("rotated: every earlier token is invalid now")
    return 0


def _guest(args: argparse.Namespace) -> int:
    with opened(args.db) as db:
        row, token = add_guest(db, args.name.strip() or None, args.secret_file)
        err_console.print(f"added guest {row.guest_name} ({row.guest_id}); token:")
        print(token)
        return 0
