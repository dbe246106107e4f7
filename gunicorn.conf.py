"""The original deployment shape: `gunicorn -c gunicorn.conf.py`.

Two uvicorn workers behind gunicorn, 120-second timeout, listening on every
address on port 5000. Each worker is an async process that holds thousands
of open streams, not one. Settings still come from the environment (and
`.env`), as for `chat-api serve`.
"""

import os
import tempfile

# Workers write their metrics here; /metrics adds them up. Set before any import.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="chat-api-metrics-"))

# The app warns at start when it listens beyond this machine without keys.
os.environ.setdefault("CHAT_API_HOST", "0.0.0.0")  # noqa: S104

wsgi_app = "chat_api.app:serve_app()"  # each worker serves this app alone
# uvicorn + uvloop + a deadline and a size limit for headers, as `chat-api serve`. It
# leaves X-Forwarded-For to the gateway, which believes it only from the proxies in
# CHAT_API_TRUSTED_PROXIES: gunicorn's `forwarded_allow_ips` is not used.
worker_class = "chat_api.worker.Worker"
# With client keys on, several workers share budgets and limits only through Redis:
# `on_starting` refuses to start them without it.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:5000")
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = None


def on_starting(server: object) -> None:
    """Check the settings once, before any worker starts, and set up our log lines."""
    from chat_api import logs
    from chat_api.cli import check_workers, load_settings

    settings = load_settings()  # a bad value stops here with one plain line
    check_workers(settings, getattr(server, "num_workers", workers))  # keys on: Redis
    logs.configure(settings.log_level, settings.log_format)


def child_exit(server: object, worker: object) -> None:
    """A worker that stopped no longer counts in the live gauges (open streams)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
