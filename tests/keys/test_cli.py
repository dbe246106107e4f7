"""`chat-api keys|usage|db` on the command line, against the same database as a running service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import GatewayFactory
from tests.keys.conftest import MASTER, RedisPlace, auth


def _cli(
    *args: str, database: str, redis: RedisPlace | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_API_", "OPENAI_"))}
    env["CHAT_API_DATABASE_URL"] = database
    if redis is not None:
        env |= {"CHAT_API_REDIS_URL": redis.url, "CHAT_API_REDIS_PREFIX": redis.prefix}
    return subprocess.run(
        [sys.executable, "-m", "chat_api", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_use_list_revoke_and_read_usage(
    gateway_factory: GatewayFactory, tmp_path: Path, shared_redis: RedisPlace
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    server = gateway_factory(
        master_key=MASTER,
        database_url=database,
        redis_url=shared_redis.url,
        redis_prefix=shared_redis.prefix,
    )
    created = _cli(
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

    listed = _cli("keys", "list", database=database)
    assert key_id in listed.stdout and "ci robot" in listed.stdout and "monthly" in listed.stdout
    assert secret not in listed.stdout and secret[:12] in listed.stdout
    shown = _cli("keys", "show", key_id, database=database)
    assert "active" in shown.stdout and secret not in shown.stdout

    httpx.get(server.url + "/usage", headers=auth(secret))  # makes the service write its rows
    usage = _cli("usage", database=database)
    assert usage.returncode == 0
    assert key_id in usage.stdout and "gpt-4o-mini" in usage.stdout

    revoked = _cli("keys", "revoke", key_id, database=database, redis=shared_redis)
    assert revoked.returncode == 0 and "Revoked" in revoked.stdout
    assert (  # the service had the key cached: the revocation reached it through Redis
        httpx.post(server.url + "/chat", json={"message": "hi"}, headers=auth(secret)).status_code
        == 401
    )


def test_mistakes_get_one_plain_line(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    for args, says in (
        (("keys", "create", "--name", "x", "--budget", "lots"), "number of dollars"),
        (("keys", "create", "--name", "x", "--models", "gpt-99"), "not in CHAT_API_MODELS"),
        (("keys", "create", "--name", "x", "--rpm", "0"), "'rpm' is out of range"),
        (("usage", "--since", "last week"), "must be a date"),
    ):
        result = _cli(*args, database=database)
        assert result.returncode != 0
        assert says in result.stderr and "Traceback" not in result.stderr
    assert "up to date" in _cli("db", "upgrade", database=database).stdout
    assert "There is no key" in _cli("keys", "revoke", "key_nope", database=database).stdout
