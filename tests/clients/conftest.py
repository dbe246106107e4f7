"""The real client libraries, each pointed at one Responses API base URL.

`responses_base_url` and `responses_api_key` are the one place that says where
the clients go. Today they point straight at the fake upstream, which proves
the fake speaks the Responses API as these libraries expect. To test them
through the gateway, return `gateway.url + "/v1"` (and the gateway's client key,
or any key while keys are off) instead; the tests stay as they are.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fakes.openai_server import FakeOpenAI, Received

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


@pytest.fixture
def responses_base_url(upstream_url: str) -> str:
    """Where the clients send their calls (the fake upstream's /v1, for now)."""
    return upstream_url


@pytest.fixture
def responses_api_key(fake: FakeOpenAI) -> str:
    """The key the clients send (the fake upstream's own, for now)."""
    return fake.api_key


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
