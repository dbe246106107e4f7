"""Settings: bad values stop startup with one clear line; `.env` is read."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from pydantic import ValidationError

from chat_api import __version__, cli, logs
from chat_api.config import Settings, base_url_hint, settings_error_line

SECRET = "tooShortSecret1"  # 15 characters: below the master key's minimum
UPSTREAM_KEY = "sk-proj-very-secret-upstream-key-0123456789"

# Run as real processes (slow to start, so few, and all at once); more cases run in-process below.
PROCESS_CASES: dict[str, tuple[dict[str, str], str]] = {
    "port-not-a-number": ({"CHAT_API_PORT": "abc"}, "CHAT_API_PORT"),
    "short-master-key": ({"CHAT_API_MASTER_KEY": SECRET}, "CHAT_API_MASTER_KEY"),
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))}


def _spawn(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`python -m chat_api serve` with `env` on top of a clean environment."""
    full = _clean_environment()
    # Should a bad value be accepted, the server must not take a real port.
    full.update({"CHAT_API_HOST": "127.0.0.1", "OPENAI_API_KEY_CYB_SEC": UPSTREAM_KEY})
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "chat_api", "serve"],
        env=full,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str], deadline: float) -> Outcome:
    try:
        stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return Outcome(-999, stdout, "STILL RUNNING: the bad setting was accepted\n" + stderr)
    return Outcome(process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    cwd = tmp_path_factory.mktemp("serve")
    started = {name: _spawn(env, cwd) for name, (env, _) in PROCESS_CASES.items()}
    deadline = time.monotonic() + 45  # generous: the processes start together
    return {name: _finish(process, deadline) for name, process in started.items()}


def assert_one_line_naming(outcome: Outcome, variable: str) -> str:
    assert outcome.returncode not in (0, -999), f"startup did not fail: {outcome.stderr!r}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {outcome.stderr!r}"
    assert variable in lines[0]
    assert UPSTREAM_KEY not in outcome.stderr + outcome.stdout
    return lines[0]


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_a_bad_setting_stops_the_process_with_one_line(
    outcomes: dict[str, Outcome], case: str
) -> None:
    line = assert_one_line_naming(outcomes[case], PROCESS_CASES[case][1])
    assert SECRET not in line


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `serve`: fail instead of starting should a bad value be accepted."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started with a bad setting")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(uvicorn.Server, "run", refuse)
    monkeypatch.setattr(logs, "configure", lambda *a: None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHAT_API_PORT", "70000"),
        ("CHAT_API_UPSTREAM_TIMEOUT", "-1"),
        ("CHAT_API_DEFAULT_MODEL", "nope"),
        ("CHAT_API_UPSTREAM_TIMEOUT", "soon"),
        ("CHAT_API_DEMO", "maybe"),
        ("CHAT_API_LOG_LEVEL", "loud"),
        ("CHAT_API_MAX_BODY_BYTES", "ten"),
        ("CHAT_API_MODELS", " , "),
        ("CHAT_API_MODEL_CAPABILITIES", '{"gpt-4o": {"streeming": false}}'),
        ("CHAT_API_MODEL_CAPABILITIES", "{not json"),
        ("CHAT_API_MODEL_CAPABILITIES", "[1, 2"),
        ("CHAT_API_PRICES", "cheap"),
        ("CHAT_API_MASTER_KEY", SECRET),
        ("CHAT_API_TRUSTED_PROXIES", "nginx"),
        ("CHAT_API_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("CHAT_API_FIELD_POLICY", '{"store": "forbid"}'),
        ("CHAT_API_FIELD_POLICY", '{"messages": "drop"}'),
        ("CHAT_API_FIELD_POLICY", "store=drop"),
    ],
)
def test_more_bad_values_stop_serve_with_one_line(
    no_server: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY_CYB_SEC", UPSTREAM_KEY)
    monkeypatch.setenv(variable, value)
    assert_serve_stops_naming(variable)


def assert_serve_stops_naming(variable: str) -> str:
    """`chat-api serve` in-process: SystemExit(<one line>), which Python prints and exits 1."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve"])
    line = stopped.value.code
    assert isinstance(line, str), "a SystemExit without a message exits silently"
    assert "\n" not in line.strip() and "Traceback" not in line
    assert variable in line
    assert UPSTREAM_KEY not in line and SECRET not in line
    return line


def test_a_typo_in_a_variable_name_stops_serve(
    no_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAT_API_DEMOO", "1")
    line = assert_serve_stops_naming("CHAT_API_DEMOO")
    assert "unknown" in line.lower()


def test_a_bad_value_in_dotenv_stops_serve_too(no_server: None, tmp_path: Path) -> None:
    assert Path.cwd() == tmp_path
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY_CYB_SEC={UPSTREAM_KEY}\nCHAT_API_PORT=abc\n")
    assert_serve_stops_naming("CHAT_API_PORT")


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "OPENAI_API_KEY_CYB_SEC=sk-from-dotenv-0123456789\n"
        "CHAT_API_MODELS=gpt-4o,o1-mini\n"
        "CHAT_API_DEFAULT_MODEL=o1-mini\n"
        "CHAT_API_UPSTREAM_TIMEOUT=33\n"
    )
    assert Path.cwd() == tmp_path
    settings = Settings()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-from-dotenv-0123456789"
    assert settings.models == ("gpt-4o", "o1-mini")
    assert settings.default_model == "o1-mini"
    assert settings.upstream_timeout == 33


def test_the_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "CHAT_API_UPSTREAM_TIMEOUT=33\nOPENAI_API_KEY_CYB_SEC=sk-dotenv-key-00001\n"
    )
    monkeypatch.setenv("CHAT_API_UPSTREAM_TIMEOUT", "44")
    monkeypatch.setenv("OPENAI_API_KEY_CYB_SEC", "sk-env-primary-key-1")
    settings = Settings()
    assert settings.upstream_timeout == 44
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-env-primary-key-1"


def test_openai_api_key_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback-key-0001")
    settings = Settings()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "sk-fallback-key-0001"


def test_security_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_API_TRUSTED_PROXIES", "10.0.0.0/8, 172.28.0.10,::1")
    monkeypatch.setenv("CHAT_API_FIELD_POLICY", '{"store": "drop", "service_tier": "refuse"}')
    settings = Settings()
    assert settings.trusted_proxies == ("10.0.0.0/8", "172.28.0.10", "::1")
    assert settings.field_policy == {"store": "drop", "service_tier": "refuse"}
    assert settings.max_body_bytes == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("env", "origins", "says"),
    [
        ({}, (), "only the gateway's own page"),
        ({"CHAT_API_MASTER_KEY": "m" * 20}, ("*",), "any website; every call still needs a key"),
        ({"CHAT_API_CORS_ORIGINS": "*"}, ("*",), "keys are off: they spend your OpenAI key"),
        ({"CHAT_API_CORS_ORIGINS": "https://a.example"}, ("https://a.example",), "a.example"),
    ],
)
def test_cors_default_follows_keys_and_startup_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], origins: tuple[str, ...], says: str
) -> None:
    from chat_api.middleware import cors_summary

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.allowed_origins == origins
    line = cors_summary(settings.allowed_origins, settings.keys_enabled)
    assert says in line and "\n" not in line


def test_a_typo_in_dotenv_stops_serve_like_one_in_the_environment(
    no_server: None, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY_CYB_SEC={UPSTREAM_KEY}\nCHAT_API_DEMOO=1\n")
    line = assert_serve_stops_naming("CHAT_API_DEMOO")
    assert "unknown" in line.lower() and ".env" in line


@pytest.mark.parametrize(
    "url",
    ["htp://api.example.com/v1", "not a url", "https://", "ftp://host/v1", "http://host:99999/v1"],
)
@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_base_url_that_is_not_a_web_address_stops_serve(
    no_server: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, where: str
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY_CYB_SEC", UPSTREAM_KEY)
    if where == ".env":
        (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={url}\n")
    else:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
    line = assert_serve_stops_naming("OPENAI_BASE_URL")
    assert "CHAT_API_OPENAI" not in line and "http:// or https://" in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OPENAI_BASE_URL", 5), ("OPENAI_API_KEY_CYB_SEC", 5), ("PROMETHEUS_MULTIPROC_DIR", 5)],
)
def test_settings_read_from_other_names_are_reported_under_those_names(
    variable: str, value: object
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**{variable: value})  # type: ignore[arg-type]
    assert settings_error_line(refused.value).startswith(f"{variable}: ")


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        (None, None),
        ("https://api.openai.com/v1", None),
        ("https://api.openai.com/v1/", None),
        ("https://api.openai.com", "/v1"),
        ("https://api.openai.com/", "/v1"),
        ("https://api.openai.com/v2", "/v1"),
        ("http://localhost:11434", "no path"),
        ("http://localhost:11434/", "no path"),
        ("http://localhost:11434/v1", None),
        ("https://proxy.example.com/openai/deployments/x", None),
    ],
)
def test_a_base_url_likely_to_answer_404_gets_a_hint(url: str | None, hint: str | None) -> None:
    said = base_url_hint(url)
    if hint is None:
        assert said is None
    else:
        assert said is not None and hint in said and "OPENAI_BASE_URL" in said


def test_serve_logs_the_base_url_hint_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    started: list[object] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, *a, **k: started.append(server))
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    monkeypatch.setenv("OPENAI_API_KEY_CYB_SEC", UPSTREAM_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434")
    monkeypatch.setenv("CHAT_API_PORT", "0")
    with caplog.at_level(logging.WARNING, logger="chat_api"):
        assert cli.main(["serve"]) == 0
    assert started, "the server was not started"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("OPENAI_BASE_URL has no path" in message for message in warnings), warnings
    assert all(UPSTREAM_KEY not in message for message in warnings)


def test_a_busy_port_stops_serve_with_one_line_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _spawn({"CHAT_API_DEMO": "1", "CHAT_API_PORT": str(port)}, tmp_path)
        outcome = _finish(process, time.monotonic() + 45)
    line = assert_one_line_naming(outcome, "CHAT_API_PORT")
    assert f"port {port} is already in use" in line
    assert "startup complete" not in outcome.stderr + outcome.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"chat-api {__version__}"
