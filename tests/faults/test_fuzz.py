"""Fuzzing: schemathesis over the OpenAPI document; hypothesis over messages and SSE framing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_api.sse import SSEParser
from tests.fakes.openai_server import FakeOpenAI
from tests.faults.conftest import FULL, GatewayMaker, size
from tests.keys.conftest import MASTER

pytestmark = pytest.mark.faults

# --- schemathesis ------------------------------------------------------------------------------


@pytest.mark.slow
def test_schemathesis_every_operation_all_checks_no_5xx(
    gw: GatewayMaker, fake: FakeOpenAI, tmp_path: Path
) -> None:
    server = gw(master_key=MASTER)
    document = httpx.get(server.url + "/openapi.json").json()
    # POST /v1/responses/compact and /input_tokens share their path with GET and DELETE
    # /v1/responses/{response_id} (as on OpenAI), so their 405 rightly allows three
    # methods where the document names one: left out of the fuzzing.
    shadowed = ("/v1/responses/compact", "/v1/responses/input_tokens")
    operations = sum(
        method in ("get", "post", "put", "patch", "delete")
        for path, item in document["paths"].items()
        if path not in shadowed
        for method in item
    )
    per_operation = size(250, 10, 40)
    st = Path(sys.executable).parent / "st"
    started = time.monotonic()
    result = subprocess.run(
        [
            str(st),
            "run",
            server.url + "/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(per_operation),
            "--header",
            f"Authorization: Bearer {MASTER}",
            "--workers",
            "1",
            # CI replays one seed (stable); the full run explores a new one each time.
            *([] if FULL else ["--seed", "20261125"]),
            "--request-timeout",
            "10",
            "--no-shrink",
            *(arg for path in shadowed for arg in ("--exclude-path", path)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    summary = output[output.rfind("SUMMARY") :]
    print(f"schemathesis ({time.monotonic() - started:.0f} s):\n{summary}")
    assert result.returncode == 0, output[-8000:]
    assert f"Tested: {operations}" in summary, summary
    assert "Server error" not in output


# --- hypothesis: message arrays --------------------------------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
SIMPLE_ROLES = ["system", "user", "assistant"]

texts = st.text(max_size=40)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.integers(),
    st.text(max_size=5),
)
contents = st.one_of(texts, st.none(), st.integers(), st.lists(parts, max_size=3), st.booleans())
roles = st.one_of(
    st.sampled_from(ROLES),
    st.sampled_from(["admin", "", "USER"]),
    st.integers(),
    st.lists(st.integers(), max_size=2),  # unhashable roles once made a 500
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.fixed_dictionaries({"role": roles}),
    st.fixed_dictionaries({"content": contents}),
    texts,
    st.integers(),
    st.none(),
)


def v1_accepts(items: Any) -> bool:
    """The contract, stated independently: when is a message array valid?"""
    if not isinstance(items, list) or not items:
        return False
    for message in items:
        if not isinstance(message, dict):
            return False
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            return False
        content = message.get("content")
        if content is None:
            if role not in ("assistant", "function"):
                return False
        elif isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                return False
        elif not isinstance(content, str):
            return False
    return True


FUZZ = settings(
    max_examples=size(600, 60, 120),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@FUZZ
@given(items=st.one_of(st.lists(messages, max_size=6), texts, st.none()), stream=st.booleans())
def test_v1_message_arrays_are_answered_or_refused_never_5xx(
    gw: GatewayMaker, fake: FakeOpenAI, items: Any, stream: bool
) -> None:
    server = _one_gateway(gw)
    before = fake.hits
    response = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": items, "stream": stream},
        timeout=10,
    )
    expected = 200 if v1_accepts(items) else 400
    assert response.status_code == expected, (items, response.text[:300])
    assert fake.hits == before + (1 if expected == 200 else 0)
    if expected == 400:
        assert response.json()["error"]["type"] == "invalid_request_error"


simple_messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(SIMPLE_ROLES), "content": texts}),
    st.fixed_dictionaries({"role": roles, "content": contents}),
)


def simple_accepts(message: Any, history: list[Any]) -> bool:
    if not isinstance(message, str) or not message.strip():
        return False
    return all(
        set(m) == {"role", "content"}
        and isinstance(m["role"], str)
        and m["role"] in SIMPLE_ROLES
        and isinstance(m["content"], str)
        for m in history
    )


@FUZZ
@given(
    message=st.one_of(texts, st.integers(), st.none()),
    history=st.lists(simple_messages, max_size=5),
    path=st.sampled_from(["/chat", "/chat/stream"]),
)
def test_simple_api_message_arrays_are_answered_or_refused_never_5xx(
    gw: GatewayMaker, fake: FakeOpenAI, message: Any, history: list[Any], path: str
) -> None:
    server = _one_gateway(gw)
    before = fake.hits
    response = httpx.post(
        server.url + path, json={"message": message, "messages": history}, timeout=10
    )
    expected = 200 if simple_accepts(message, history) else 400
    assert response.status_code == expected, (message, history, response.text[:300])
    assert fake.hits == before + (1 if expected == 200 else 0)


_CURRENT: list[tuple[GatewayMaker, Any]] = []


def _one_gateway(gw: GatewayMaker) -> Any:
    """One gateway per test, however many examples hypothesis runs (keyed by the factory)."""
    if not _CURRENT or _CURRENT[0][0] is not gw:
        _CURRENT[:] = [(gw, gw())]
    return _CURRENT[0][1]


# --- hypothesis: SSE chunk boundaries -----------------------------------------------------------

# A data value may hold anything but line breaks (SSE has no escape for them).
values = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]))
events_strategy = st.lists(
    st.tuples(
        st.lists(values, min_size=0, max_size=3),  # data lines (none: a comment-only block)
        st.booleans(),  # a comment line first
        st.booleans(),  # an id field
        st.sampled_from(["data: ", "data:"]),
    ),
    max_size=8,
)


def _serialize(events: list[tuple[list[str], bool, bool, str]], newline: str) -> bytes:
    out = ""
    for data, comment, with_id, prefix in events:
        lines = [": keep-alive"] if comment else []
        if with_id:
            lines.append("id: 7")
        # "data:" followed by a value that starts with a space keeps that space only after
        # the one optional space: write "data: " then the value to stay unambiguous.
        lines += [(prefix if not v.startswith(" ") else "data: ") + v for v in data]
        if not lines:
            lines = [": empty"]
        out += newline.join(lines) + newline + newline
    return out.encode()


def _expected(events: list[tuple[list[str], bool, bool, str]]) -> list[bytes]:
    return ["\n".join(data).encode() for data, *_ in events if data]


def _feed(raw: bytes, cuts: list[int]) -> list[bytes]:
    parser = SSEParser()
    found: list[bytes] = []
    last = 0
    for cut in sorted(set(cuts)):
        found += parser.feed(raw[last:cut])
        last = cut
    found += parser.feed(raw[last:])
    found += parser.finish()
    return found


@settings(max_examples=size(3000, 300, 600), deadline=None, database=None)
@given(events=events_strategy, data=st.data())
def test_sse_parser_is_blind_to_chunk_boundaries(events: Any, data: st.DataObject) -> None:
    raw = _serialize(events, "\n")
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    assert _feed(raw, cuts) == _expected(events)
    # and the multi-byte characters come out whole, whatever the cuts
    for payload in _feed(raw, cuts):
        payload.decode("utf-8")


@settings(max_examples=size(3000, 300, 600), deadline=None, database=None)
@given(events=events_strategy, data=st.data())
def test_sse_parser_with_crlf_is_blind_to_chunk_boundaries(
    events: Any, data: st.DataObject
) -> None:
    raw = _serialize(events, "\r\n")
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    assert _feed(raw, cuts) == _expected(events)


def test_crlf_split_between_cr_and_lf_keeps_one_event() -> None:
    raw = b"data: first line\r\ndata: second line\r\n\r\n"
    cut = raw.index(b"\r\n") + 1
    assert _feed(raw, [cut]) == [b"first line\nsecond line"]
