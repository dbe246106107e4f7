"""The `chat-api` command: `serve`, and (with keys on) `keys`, `usage`, `db`."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from chat_api.config import Settings, settings_error_line, unknown_variables
from chat_api.manage import add_commands


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


def _stopped(signum: int, frame: object) -> None:
    """Uvicorn stops gracefully, then raises the signal again: that is a clean exit."""
    raise SystemExit(0)


def _serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from chat_api.protocol import SERVER_OPTIONS

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped)

    from chat_api import logs

    overrides: dict[str, object] = {}
    if args.demo:
        overrides["demo"] = True
    settings = load_settings(**overrides)
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    level = args.log_level or settings.log_level
    logs.configure(level, settings.log_format)
    if args.workers > 1 or args.demo:
        # Workers are separate processes that read the environment again.
        import os
        import tempfile

        if args.demo:
            os.environ["CHAT_API_DEMO"] = "1"
        if args.workers > 1 and not settings.prometheus_multiproc_dir:
            # Every worker writes its metrics here; /metrics adds them up.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-api-metrics-")
        uvicorn.run(
            "chat_api.app:serve_app",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            log_config=None,
            access_log=False,
            **SERVER_OPTIONS,
            backlog=args.backlog,
            timeout_graceful_shutdown=int(settings.shutdown_grace),
        )
        return 0
    from chat_api.app import create_app

    uvicorn.run(
        create_app(settings, own_process=True),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        **SERVER_OPTIONS,
        backlog=args.backlog,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (CHAT_API_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (CHAT_API_PORT)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--backlog",
        type=int,
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
