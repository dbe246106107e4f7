"""`chat-api keys|usage|db` on the command line, against the same database as a running service."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chat_api import cli
from chat_api.cli_admin import table
from tests.conftest import GatewayFactory
from tests.keys.conftest import MASTER, RedisPlace, auth


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Ran]:
    """`chat-api ARGS` in this process, with the database (and Redis) it is given."""

    def run(*args: str, database: str, redis: RedisPlace | None = None) -> Ran:
        with monkeypatch.context() as env:
            env.setenv("CHAT_API_DATABASE_URL", database)
            if redis is not None:
                env.setenv("CHAT_API_REDIS_URL", redis.url)
                env.setenv("CHAT_API_REDIS_PREFIX", redis.prefix)
            capsys.readouterr()
            code = cli.main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def test_the_installed_command_runs(tmp_path: Path) -> None:
    """The one real process: the `chat-api` script pip installed makes a key."""
    command = Path(sys.executable).parent / "chat-api"
    if not command.exists():
        pytest.skip(f"no installed chat-api command next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))}
    env["CHAT_API_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    created = subprocess.run(
        [str(command), "keys", "create", "--name", "smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    assert re.search(r"cak_[\w-]+", created.stdout)


def test_create_use_list_revoke_and_read_usage(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    shared_redis: RedisPlace,
    run_cli: Callable[..., Ran],
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    server = gateway_factory(
        master_key=MASTER,
        database_url=database,
        redis_url=shared_redis.url,
        redis_prefix=shared_redis.prefix,
    )
    created = run_cli(
        "keys",
        "create",
        "--name",
        "ci robot",
        "--budget",
        "2.50",
        "--period",
        "monthly",
        "--rpm",
        "60",
        "--models",
        "gpt-4o-mini",
        database=database,
    )
    assert created.returncode == 0, created.stderr
    secret = re.search(r"cak_[\w-]+", created.stdout).group(0)  # type: ignore[union-attr]
    key_id = re.search(r"key_[0-9a-f]+", created.stdout).group(0)  # type: ignore[union-attr]

    assert (
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 200
    )

    listed = run_cli("keys", "list", database=database)
    assert key_id in listed.stdout and "ci robot" in listed.stdout and "monthly" in listed.stdout
    assert secret not in listed.stdout and secret[:12] in listed.stdout
    shown = run_cli("keys", "show", key_id, database=database)
    assert "active" in shown.stdout and secret not in shown.stdout

    httpx.get(server.url + "/usage", headers=auth(secret))  # makes the service write its rows
    usage = run_cli("usage", database=database)
    assert usage.returncode == 0
    assert key_id in usage.stdout and "gpt-4o-mini" in usage.stdout

    revoked = run_cli("keys", "revoke", key_id, database=database, redis=shared_redis)
    assert revoked.returncode == 0 and "Revoked" in revoked.stdout
    assert (  # the service had the key cached: the revocation reached it through Redis
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 401
    )


CREATE = ("keys", "create", "--name", "x")


@pytest.mark.parametrize(
    ("args", "flag", "says"),
    [
        (("usage", "--since", "yesterday"), "--since", "expected a date like 2026-11-30"),
        (("usage", "--until", "soon"), "--until", "expected a date like 2026-11-30"),
        ((*CREATE, "--budget", "lots"), "--budget", "number of dollars"),
        ((*CREATE, "--budget", "NaN"), "--budget", "number of dollars"),
        ((*CREATE, "--budget", "-1"), "--budget", "greater than or equal"),
        ((*CREATE, "--budget", "0.1234567"), "--budget", "6 decimal"),
        ((*CREATE, "--models", "gpt-99"), "--models", "CHAT_API_MODELS"),
        ((*CREATE, "--rpm", "0"), "--rpm", "whole number of 1 or more"),
        ((*CREATE, "--rpm", "many"), "--rpm", "whole number"),
        ((*CREATE, "--rpm", "2000000000"), "--rpm", "less than or equal"),
        ((*CREATE, "--tpm", "1.5"), "--tpm", "whole number"),
        ((*CREATE, "--days", "soon"), "--days", "number of days"),
        ((*CREATE, "--days", "0"), "--days", "greater than 0"),
        ((*CREATE, "--period", "weekly"), "--period", "daily"),
        (("keys", "create", "--name", ""), "--name", "at least 1 character"),
        (("keys", "create"), "--name", "required"),
        (("serve", "--port", "70000"), "--port", "from 0 to 65535"),
        (("serve", "--port", "http"), "--port", "from 0 to 65535"),
        (("serve", "--workers", "0"), "--workers", "of 1 or more"),
        (("serve", "--backlog", "lots"), "--backlog", "of 1 or more"),
        (("serve", "--log-level", "loud"), "--log-level", "debug"),
    ],
)
def test_a_wrong_flag_is_named_in_one_plain_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    flag: str,
    says: str,
) -> None:
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/cli.db")
    with pytest.raises(SystemExit) as stopped:
        cli.main(list(args))
    # argparse prints its usage and a line, then exits 2; our own checks exit with their line.
    code = stopped.value.code
    said = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code not in (0, None)
    assert flag in said and says in said, said
    assert "Traceback" not in said and "'date'" not in said


def test_other_mistakes_get_one_plain_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/cli.db")
    assert cli.main(["db", "upgrade"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["keys", "revoke", "key_nope"]) == 1
    assert "There is no key" in capsys.readouterr().out


@pytest.mark.parametrize("keys_on", [False, True], ids=["keys-off", "keys-on"])
def test_a_key_made_while_keys_are_off_comes_with_a_warning(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    keys_on: bool,
) -> None:
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/cli.db")
    if keys_on:
        monkeypatch.setenv("CHAT_API_MASTER_KEY", MASTER)
    assert cli.main(["keys", "create", "--name", "early"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"cak_[\w-]+", out), "the key is still made"
    if keys_on:
        assert err == ""
    else:
        assert "CHAT_API_MASTER_KEY" in err and "not checked" in err
        assert len(err.strip().splitlines()) == 1


def test_the_usage_table_shows_dollars_in_full() -> None:
    rows = [{"cost_usd": 1.35e-05}, {"cost_usd": 0.0}, {"cost_usd": 2.5}, {"cost_usd": 12.0}]
    lines = table(rows, ["cost_usd"]).splitlines()[2:]
    assert lines == ["0.0000135", "0", "2.5", "12"]


def test_several_workers_with_client_keys_need_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each worker would hold its own budgets: a key could spend them all (1.8x, two workers)."""
    monkeypatch.setenv("CHAT_API_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("CHAT_API_MASTER_KEY", MASTER)
    monkeypatch.delenv("CHAT_API_REDIS_URL", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--workers", "2", "--port", "0"])
    assert stopped.value.code == (
        "chat-api: 2 workers cannot share client keys' budgets and limits without Redis: "
        "set CHAT_API_REDIS_URL, or run one worker."
    )
    # gunicorn.conf.py (2 workers, or WEB_CONCURRENCY): refused before any worker starts,
    # with the settings as the workers would read them.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # it sets these if missing
    monkeypatch.setenv("CHAT_API_HOST", "127.0.0.1")
    config_file = str(Path(__file__).resolve().parents[2] / "gunicorn.conf.py")
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    config = runpy.run_path(config_file)
    assert config["workers"] == 2
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](None)
    assert "2 workers cannot share" in str(stopped.value.code)
    monkeypatch.setenv("CHAT_API_REDIS_URL", "redis://127.0.0.1:6379/0")  # shared: fine
    cli.check_workers(cli.load_settings(), 2)
