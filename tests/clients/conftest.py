"""The real client libraries, each pointed at one Responses API base URL.

`responses_base_url` and `responses_api_key` are the one place that says where
the clients go. They point at the gateway (keys on, a client key with
a budget) in front of the fake upstream; pointed straight at the fake, the
same tests prove the fake speaks the Responses API as these libraries expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import GatewayPool
from tests.fakes.openai_server import FakeOpenAI, Received
from tests.keys.conftest import MASTER, make_key
from tests.servers import ServerThread

MODEL = "gpt-4o-mini"
WEATHER_CALL = {
    "call_id": "call_weather_paris",
    "name": "get_weather",
    "arguments": '{"city":"Paris"}',
}
FINAL_ANSWER = "It is sunny in Paris today."
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@dataclass
class Through:
    """The gateway the clients go through: keys on, one client key."""

    url: str
    key: str


@pytest.fixture
def through(shared_gateways: GatewayPool[ServerThread], fake: FakeOpenAI) -> Through:
    """The module's gateway (the libraries only make calls), with a key of this test's own."""
    server = shared_gateways.get(master_key=MASTER, embedding_models=("text-embedding-3-small",))
    key, _ = make_key(server.url, name="client library", budget_usd="5")
    return Through(server.url, key)


@pytest.fixture
def responses_base_url(through: Through) -> str:
    """Where the clients send their calls: the gateway's /v1, in front of the fake."""
    return through.url + "/v1"


@pytest.fixture
def responses_api_key(through: Through) -> str:
    """The key the clients send: a client key of the gateway, with a budget."""
    return through.key


def weather(city: str) -> str:
    """What every client's get_weather tool answers."""
    return f"sunny, 22 C in {city}"


def tool_outputs(fake: FakeOpenAI) -> list[dict[str, Any]]:
    """Every function_call_output the upstream was sent, in order."""
    found = []
    for record in fake.received:
        items = record.body.get("input")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                found.append(item)
    return found


def response_calls(fake: FakeOpenAI) -> list[Received]:
    return [r for r in fake.received if r.path == "/v1/responses" and r.method == "POST"]


def arguments(raw: str) -> Any:
    return json.loads(raw)
