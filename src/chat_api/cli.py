"""The `chat-api` command: `serve`, and (with keys on) `keys`, `usage`, `db`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from chat_api import __version__, logs
from chat_api.cli_admin import add_commands, whole_number
from chat_api.config import Settings, base_url_hint, settings_error_line, unknown_variables

if TYPE_CHECKING:
    from chat_api.app import GatewayApp

log = logging.getLogger("chat_api")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; a bad value exits with one plain line."""
    unknown = unknown_variables()
    if unknown:
        raise SystemExit(
            f"chat-api: unknown setting {unknown[0]}: no such variable (see the README's settings)."
        )
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SystemExit(f"chat-api: {settings_error_line(exc)}") from None
    except SettingsError as exc:  # a value that should be JSON and is not
        raise SystemExit(f"chat-api: {settings_error_line(exc)}") from None


def check_workers(settings: Settings, workers: int) -> None:
    """Several workers with client keys need Redis: without it each would hold its own budgets.

    Each worker would let a key spend its whole budget (measured: two workers, 1.8 times
    the budget), and its own rate limits. One worker holds thousands of open streams.
    """
    if workers > 1 and settings.keys_enabled and not settings.redis_url:
        raise SystemExit(
            f"chat-api: {workers} workers cannot share client keys' budgets and limits "
            "without Redis: set CHAT_API_REDIS_URL, or run one worker."
        )


def _stopped(signum: int, frame: object) -> None:
    """Uvicorn stops gracefully, then raises the signal again: that is a clean exit."""
    raise SystemExit(0)


class Server(uvicorn.Server):
    """uvicorn's server, which finishes its work when a second Ctrl-C stops it at once.

    On a second Ctrl-C uvicorn stops waiting for open requests and skips the
    app's shutdown, leaving both to be cancelled as the event loop closes,
    each with a traceback. Here the open requests are cancelled first (a
    stream ends with its "send it again" event and settles its call), then
    the app shuts down as usual, so the ledger is written and nothing is left.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if not self.force_exit:
            return
        left = list(self.server_state.tasks)
        if left:
            log.warning("second Ctrl-C: stopping at once, ending %d open request(s)", len(left))
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self.lifespan.shutdown()


def worker_app() -> GatewayApp:
    """The app of one `serve --workers N` process, logging as a single process does."""
    from chat_api.app import create_app

    settings = Settings()  # the parent checked them; workers read the same environment
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings, own_process=True)


def _check_port(host: str, port: int) -> None:
    """Fail with one line, before anything starts, when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"chat-api: port {port} is already in use: stop the other program "
                    "or set CHAT_API_PORT (or --port)."
                ) from None
            reason = exc.strerror or str(exc)
            raise SystemExit(
                f"chat-api: cannot listen on {host}:{port}: {reason} (check CHAT_API_HOST)."
            ) from None


def _serve(args: argparse.Namespace) -> int:
    from chat_api.serving import SERVER_OPTIONS

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)

    overrides: dict[str, object] = {}
    if args.demo:
        overrides["demo"] = True
    settings = load_settings(**overrides)
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    level = args.log_level or settings.log_level
    logs.configure(level, settings.log_format)
    hint = base_url_hint(settings.openai_base_url)
    if hint is not None:
        log.warning(hint)
    check_workers(settings, args.workers)
    _check_port(host, port)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        **SERVER_OPTIONS,  # uvloop, the guarded protocol, X-Forwarded-For left to the gateway
        "backlog": args.backlog,
        "timeout_graceful_shutdown": int(settings.shutdown_grace),
    }
    if args.workers > 1:
        # Workers are separate processes that read the environment again.
        import tempfile

        if args.demo:
            os.environ["CHAT_API_DEMO"] = "1"
        if args.log_level:
            os.environ["CHAT_API_LOG_LEVEL"] = args.log_level
        if not settings.prometheus_multiproc_dir:
            # Every worker writes its metrics here; /metrics adds them up.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-api-metrics-")
        uvicorn.run("chat_api.cli:worker_app", factory=True, workers=args.workers, **options)
        return 0
    from chat_api.app import create_app

    Server(uvicorn.Config(create_app(settings, own_process=True), **options)).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-api", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (CHAT_API_HOST)")
    serve.add_argument(
        "--port", type=whole_number(0, 65535), help="port to listen on (CHAT_API_PORT)"
    )
    serve.add_argument(
        "--workers", type=whole_number(1), default=1, help="worker processes (default 1)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--backlog",
        type=whole_number(1),
        default=2048,
        help="pending connections the kernel may queue (default 2048; raise for bursts)",
    )
    serve.add_argument("--demo", action="store_true", help="use the offline demo model")
    serve.set_defaults(handler=_serve)
    add_commands(commands, load_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
