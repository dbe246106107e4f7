"""SIGTERM: stop taking new work, let streams finish within the grace, lose no usage row."""

from __future__ import annotations

import gc
import json
import runpy
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from gunicorn.util import import_app

from chat_api.app import create_app
from chat_api.config import Settings
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan
from tests.ops.conftest import GatewayProcess, Spawn
from tests.servers import ServerThread


def _env(fake: FakeOpenAI, upstream_url: str, tmp_path: Path, grace: float) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": fake.api_key,
        "OPENAI_BASE_URL": upstream_url,
        "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
        "CHAT_API_SHUTDOWN_GRACE": str(grace),
        "CHAT_API_LEDGER_FLUSH_INTERVAL": "30",  # rows stay queued until shutdown
    }


def _rows(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        return list(db.execute("SELECT endpoint, outcome FROM usage ORDER BY id"))


class StreamReader(threading.Thread):
    def __init__(self, gateway: GatewayProcess, path: str, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = gateway.url + path, body
        self.events: list[str] = []
        self.first = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.events.append(line[5:].strip())
                        self.first.set()
        except Exception as exc:
            self.error = exc


def test_open_streams_finish_within_the_grace(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    gateway = spawn(_env(fake, upstream_url, tmp_path, grace=10))
    for _ in range(3):
        assert httpx.post(gateway.url + "/chat", json={"message": "hi"}).status_code == 200
    fake.queue(Plan(chunk_interval=0.1))
    reader = StreamReader(gateway, "/chat/stream", {"message": "hi"})
    reader.start()
    assert reader.first.wait(5)
    gateway.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.HTTPError):  # no new work once stopping
        httpx.post(gateway.url + "/chat", json={"message": "late"}, timeout=2)
    assert gateway.wait(20) == 0
    reader.join(5)
    assert reader.error is None
    assert "".join(json.loads(e).get("content", "") for e in reader.events) == DEFAULT_TEXT
    assert json.loads(reader.events[-1])["done"] is True
    rows = _rows(tmp_path)
    assert len(rows) == 4 == fake.hits  # every call's row, written at shutdown
    assert rows[-1] == ("/chat/stream", "ok")


@pytest.mark.parametrize("path", ["/chat/stream", "/v1/chat/completions"])
def test_streams_past_the_grace_end_with_a_clear_error(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path, path: str
) -> None:
    gateway = spawn(_env(fake, upstream_url, tmp_path, grace=1))
    fake.queue(Plan(text=" ".join(["long"] * 300), chunk_interval=0.1))
    body: dict[str, object] = {"message": "hi"}
    if path.startswith("/v1"):
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    reader = StreamReader(gateway, path, body)
    reader.start()
    assert reader.first.wait(5)
    started = time.monotonic()
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(20) == 0
    reader.join(5)
    assert time.monotonic() - started < 10
    last = json.loads(reader.events[-1])
    error = last["error"] if isinstance(last["error"], str) else last["error"]["message"]
    assert "restarting" in error
    assert fake.last().closed_early.wait(5)  # the upstream call was closed, not left running
    rows = _rows(tmp_path)
    assert len(rows) == 1 and rows[0][0] == path


def test_a_served_app_quiets_the_garbage_collector_and_gives_it_back(
    fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        openai_api_key=fake.api_key,
        openai_base_url=upstream_url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/gateway.db",
    )
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    with ServerThread(create_app(settings, own_process=True)) as served:
        assert httpx.get(served.url + "/health").status_code == 200
        assert gc.get_threshold() == (50_000, 20, 10)
        assert gc.get_freeze_count() > frozen  # start-up objects are no longer walked
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
    with ServerThread(create_app(settings)) as hosted:  # inside another program: hands off
        assert httpx.get(hosted.url + "/health").status_code == 200
        assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)


def test_gunicorn_workers_load_the_app_that_quiets_the_collector(
    monkeypatch: pytest.MonkeyPatch, fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    # gunicorn.conf.py only sets these when missing: keep them out of later tests.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("CHAT_API_HOST", "127.0.0.1")
    monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", upstream_url)
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/gateway.db")
    config = runpy.run_path(str(Path(__file__).resolve().parents[2] / "gunicorn.conf.py"))
    app = import_app(config["wsgi_app"])  # as each gunicorn worker loads it
    with ServerThread(app) as served:
        assert httpx.get(served.url + "/health").status_code == 200
        assert gc.get_threshold() == (50_000, 20, 10)


def test_a_second_ctrl_c_stops_at_once_and_quietly(spawn: Spawn, tmp_path: Path) -> None:
    gateway = spawn(
        {
            "CHAT_API_DEMO": "1",
            "CHAT_API_DEMO_DELAY": "0.2",  # the demo's answer takes about ten seconds
            "CHAT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
            "CHAT_API_LEDGER_FLUSH_INTERVAL": "30",  # rows stay queued until shutdown
        }
    )
    reader = StreamReader(gateway, "/chat/stream", {"message": "hi"})
    reader.start()
    assert reader.first.wait(10)
    gateway.signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while "Shutting down" not in gateway.logs():  # the first Ctrl-C has been taken
        assert time.monotonic() < deadline, gateway.logs()
        time.sleep(0.05)
    gateway.signal(signal.SIGINT)
    assert gateway.wait(20) == 0
    reader.join(5)
    logs = gateway.logs()
    assert "Traceback" not in logs, logs
    assert "second Ctrl-C" in logs
    last = json.loads(reader.events[-1])
    assert "restarting" in last["error"]  # the client was told, not cut off
    assert _rows(tmp_path) == [("/chat/stream", "client_closed")]  # and the call was recorded
