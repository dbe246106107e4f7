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
from tests.conftest import GatewayFactory
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(20) == 0  # well before the answer's 30 s: the grace cut it
    reader.join(5)
    last = json.loads(reader.events[-1])
    error = last["error"] if isinstance(last["error"], str) else last["error"]["message"]
    assert "restarting" in error
    assert fake.last().closed_early.wait(5)  # the upstream call was closed, not left running
    assert _rows(tmp_path) == [(path, "server_stopped")]
    assert "Traceback" not in gateway.logs()


@pytest.mark.slow
def test_a_background_stream_cut_at_the_end_of_the_grace_is_billed_at_its_worst_case(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    """OpenAI goes on writing a background answer; nobody is left to ask how it ended.

    Before: its stream, cut after the engine had drained, started a watch that the
    stopping loop cancelled after the ledger had closed: the call left no row.
    """
    gateway = spawn(_env(fake, upstream_url, tmp_path, grace=1))
    fake.queue(Plan(text=" ".join(["long"] * 300), chunk_interval=0.1))
    body = {"model": "gpt-4o-mini", "input": "hi", "background": True, "stream": True}
    body["max_output_tokens"] = 500
    reader = StreamReader(gateway, "/v1/responses", body)
    reader.start()
    assert reader.first.wait(5)
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(20) == 0
    reader.join(5)
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = list(db.execute("SELECT endpoint, completion_tokens, estimated FROM usage"))
    assert rows == [("/v1/responses", 500, 1)]  # its worst case, marked estimated
    assert "Traceback" not in gateway.logs()


def _ask(gateway: GatewayProcess, path: str, out: dict[str, httpx.Response]) -> None:
    body: dict[str, object] = {"message": "hi"}
    if path.startswith("/v1"):
        body = {"messages": [{"role": "user", "content": "hi"}]}
    out[path] = httpx.post(gateway.url + path, json=body, timeout=30)


@pytest.mark.slow
def test_whole_answers_past_the_grace_get_a_503_and_the_ledger_says_the_server_stopped(
    spawn: Spawn, fake: FakeOpenAI, upstream_url: str, tmp_path: Path
) -> None:
    gateway = spawn(_env(fake, upstream_url, tmp_path, grace=1))
    fake.queue(Plan(delay_before_headers=30), Plan(delay_before_headers=30))
    answers: dict[str, httpx.Response] = {}
    askers = [
        threading.Thread(target=_ask, args=(gateway, path, answers))
        for path in ("/chat", "/v1/chat/completions")
    ]
    for asker in askers:
        asker.start()
    deadline = time.monotonic() + 5
    while fake.hits < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.hits == 2
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(20) == 0
    for asker in askers:
        asker.join(5)

    simple, v1 = answers["/chat"], answers["/v1/chat/completions"]
    for answer in (simple, v1):
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["retry-after"] == "1"
    assert "restarting" in simple.json()["error"]
    assert v1.json()["error"]["code"] == "server_stopping"
    assert "restarting" in v1.json()["error"]["message"]
    logs = gateway.logs()
    assert "Traceback" not in logs and "Exception in ASGI application" not in logs
    rows = _rows(tmp_path)
    assert sorted(rows) == [("/chat", "server_stopped"), ("/v1/chat/completions", "server_stopped")]


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


def test_a_whole_answer_the_server_stopped_is_billed_at_its_worst_case(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.queue(Plan(delay_before_headers=30))
    server = gateway_factory()  # in a thread, with a grace of 1 s
    answers: dict[str, httpx.Response] = {}
    asker = threading.Thread(target=lambda: answers.update(
        chat=httpx.post(server.url + "/chat", json={"message": "hi"}, timeout=30)
    ))  # fmt: skip
    asker.start()
    deadline = time.monotonic() + 5
    while fake.hits < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop()
    asker.join(5)
    assert answers["chat"].status_code == 503
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        row = db.execute(
            "SELECT outcome, prompt_tokens, completion_tokens, estimated FROM usage"
        ).fetchone()
    assert row[0] == "server_stopped"
    # OpenAI may still write and bill the whole answer: its prompt and the model's ceiling.
    assert row[1] > 0 and row[2] >= 4096 and row[3] == 1


@pytest.mark.slow
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
    assert _rows(tmp_path) == [("/chat/stream", "server_stopped")]  # and the call was recorded
