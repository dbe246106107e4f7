"""The demo model on the Responses API: every object and event as the openai SDK types them.

The last tests serve the demo over real HTTP (a small Starlette app standing in
for the routes the gateway will give it) to openai-python and the Agents SDK.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.conversations import Conversation, ConversationItemList
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from chat_api.app import create_app
from chat_api.config import Settings
from chat_api.errors import BadRequest, NotFound
from chat_api.providers.demo_responses import DemoResponses, demo_embeddings
from tests.servers import ServerThread

EVENT = TypeAdapter[Any](ResponseStreamEvent)
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture
def demo() -> DemoResponses:
    return DemoResponses(delay=0)


def collect(demo: DemoResponses, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream a response and parse its frames, checking the framing on the way."""

    async def read() -> list[bytes]:
        return [chunk async for chunk in demo.start(body).events()]

    events = []
    for chunk in asyncio.run(read()):
        assert chunk.endswith(b"\n\n")
        head, data = chunk.removesuffix(b"\n\n").split(b"\n")
        event = json.loads(data.removeprefix(b"data: "))
        assert head == b"event: " + event["type"].encode()
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_whole_response_quotes_the_question_and_is_kept(demo: DemoResponses) -> None:
    answer = Response.model_validate(
        demo.start({"model": "gpt-4o-mini", "input": "What is chat-api?"}).whole()
    )
    assert answer.status == "completed"
    assert "What is chat-api?" in answer.output_text and "demo model" in answer.output_text
    assert answer.usage is not None and answer.usage.output_tokens > 10
    assert Response.model_validate(demo.retrieve(answer.id)) == answer
    items = ResponseItemList.model_validate(demo.input_items(answer.id, {}))
    assert [item.type for item in items.data] == ["message"]
    assert demo.delete(answer.id)["deleted"] is True
    with pytest.raises(NotFound):
        demo.retrieve(answer.id)


def test_the_same_question_gets_the_same_answer(demo: DemoResponses) -> None:
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "Hi"}]}
    first, second = demo.start(body).whole(), demo.start(body).whole()
    assert first["output"][0]["content"] == second["output"][0]["content"]


def test_a_stream_follows_openais_order(demo: DemoResponses) -> None:
    events = collect(demo, {"model": "gpt-4o-mini", "input": "Tell me a story"})
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    final = Response.model_validate(events[-1]["response"])
    assert len(deltas) > 10 and "".join(deltas) == final.output_text
    assert final.usage is not None and final.usage.output_tokens == len(deltas)
    assert demo.retrieve(final.id)["status"] == "completed"


def test_a_question_naming_a_tool_calls_it_with_arguments_from_the_question(
    demo: DemoResponses,
) -> None:
    body = {
        "model": "gpt-4o",
        "input": "What will the weather be in Paris for 3 days?",
        "tools": [WEATHER_TOOL],
    }
    first = Response.model_validate(demo.start(body).whole())
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 22 C"}
    second = Response.model_validate(
        demo.start(
            {
                "model": "gpt-4o",
                "previous_response_id": first.id,
                "input": [result],
                "tools": [WEATHER_TOOL],
            }
        ).whole()
    )
    assert second.output_text == "The tool get_weather answered: sunny, 22 C"
    streamed = collect(demo, body)
    kinds = [e["type"] for e in streamed]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


@pytest.mark.parametrize(
    ("question", "choice", "calls"),
    [
        ("Tell me a joke", "auto", False),
        ("Tell me a joke", "required", True),
        ("What is the weather in Rome?", "none", False),
        ("Tell me a joke", {"type": "function", "name": "get_weather"}, True),
    ],
)
def test_tool_choice_decides_like_a_model(
    demo: DemoResponses, question: str, choice: Any, calls: bool
) -> None:
    body = {"model": "gpt-4o", "input": question, "tools": [WEATHER_TOOL], "tool_choice": choice}
    answer = Response.model_validate(demo.start(body).whole())
    assert (answer.output[0].type == "function_call") is calls


def test_max_output_tokens_makes_it_incomplete(demo: DemoResponses) -> None:
    answer = Response.model_validate(
        demo.start({"model": "gpt-4o", "input": "hi", "max_output_tokens": 5}).whole()
    )
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None
    assert answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage is not None and answer.usage.output_tokens == 5


def test_unknown_or_conflicting_ids_are_refused_before_anything_is_sent(
    demo: DemoResponses,
) -> None:
    with pytest.raises(BadRequest) as unknown:
        demo.start({"model": "gpt-4o", "previous_response_id": "resp_nope"})
    assert unknown.value.code == "previous_response_not_found"
    with pytest.raises(NotFound):
        demo.start({"model": "gpt-4o", "conversation": "conv_nope"})
    with pytest.raises(BadRequest):
        demo.start({"model": "gpt-4o", "conversation": "c", "previous_response_id": "r"})
    with pytest.raises(BadRequest):
        demo.start({"model": "gpt-4o", "input": 42})


def test_store_false_keeps_nothing_and_the_store_keeps_the_most_recent() -> None:
    demo = DemoResponses(delay=0, capacity=2)
    unstored = demo.start({"model": "gpt-4o", "input": "x", "store": False}).whole()
    with pytest.raises(NotFound):
        demo.retrieve(unstored["id"])
    ids = [demo.start({"model": "gpt-4o", "input": str(n)}).whole()["id"] for n in range(3)]
    with pytest.raises(NotFound):
        demo.retrieve(ids[0])
    assert demo.retrieve(ids[2])["id"] == ids[2]


def test_background_responses_finish_at_once_and_cancel_returns_them(demo: DemoResponses) -> None:
    answer = demo.start({"model": "gpt-4o", "input": "x", "background": True}).whole()
    assert answer["background"] is True and answer["status"] == "completed"
    assert demo.cancel(answer["id"])["status"] == "completed"
    plain = demo.start({"model": "gpt-4o", "input": "x"}).whole()
    with pytest.raises(BadRequest):
        demo.cancel(plain["id"])


def test_conversations_collect_their_turns(demo: DemoResponses) -> None:
    made = Conversation.model_validate(
        demo.create_conversation(
            {"metadata": {"a": "b"}, "items": [{"role": "user", "content": "Hi"}]}
        )
    )
    demo.start({"model": "gpt-4o", "input": "Again", "conversation": made.id}).whole()
    listed = ConversationItemList.model_validate(demo.conversation_items(made.id, {"order": "asc"}))
    assert [getattr(item, "role", None) for item in listed.data] == ["user", "user", "assistant"]
    newest = demo.conversation_items(made.id, {"limit": "1"})
    assert newest["has_more"] is True and newest["data"][0]["role"] == "assistant"
    added = demo.add_conversation_items(made.id, {"items": [{"role": "user", "content": "More"}]})
    (item,) = ConversationItemList.model_validate(added).data
    assert demo.conversation_item(made.id, item.id)["id"] == item.id
    assert demo.delete_conversation_item(made.id, item.id)["id"] == made.id
    with pytest.raises(NotFound):
        demo.conversation_item(made.id, item.id)
    assert demo.update_conversation(made.id, {"metadata": {"a": "c"}})["metadata"] == {"a": "c"}
    assert demo.delete_conversation(made.id)["object"] == "conversation.deleted"
    with pytest.raises(NotFound):
        demo.conversation(made.id)


def test_embeddings_are_deterministic_unit_vectors() -> None:
    body = {"model": "text-embedding-3-small", "input": ["a cat", "a dog"]}
    result = CreateEmbeddingResponse.model_validate(demo_embeddings(body))
    cat, dog = (d.embedding for d in result.data)
    assert len(cat) == 1536 and cat != dog
    assert math.isclose(sum(x * x for x in cat), 1.0)
    assert demo_embeddings(body)["data"][0]["embedding"] == cat
    short = demo_embeddings({**body, "dimensions": 32})["data"][0]["embedding"]
    assert len(short) == 32 and math.isclose(sum(x * x for x in short), 1.0)
    packed = demo_embeddings({**body, "encoding_format": "base64"})["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert struct.unpack(f"<{len(raw) // 4}f", raw) == pytest.approx(cat, abs=1e-6)
    assert result.usage.prompt_tokens > 0
    for bad in ({**body, "input": ""}, {**body, "input": []}, {**body, "dimensions": 0}):
        with pytest.raises(BadRequest):
            demo_embeddings(bad)


# --- through the gateway in demo mode, to real clients -------------------------------


@pytest.fixture
def demo_url(tmp_path: Path) -> Iterator[str]:
    """The gateway as `make demo` starts it: demo mode, no key."""
    settings = Settings(
        demo=True, demo_delay=0, database_url=f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    )
    with ServerThread(create_app(settings)) as server:
        yield server.url + "/v1"


def test_openai_python_streams_from_the_demo(demo_url: str) -> None:
    with openai.OpenAI(base_url=demo_url, api_key="demo") as client:
        with client.responses.stream(model="gpt-4o-mini", input="Hello demo") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert "".join(deltas) == final.output_text and "Hello demo" in final.output_text
        vectors = client.embeddings.create(model="text-embedding-3-small", input="x")
        assert len(vectors.data[0].embedding) == 1536
        kept = client.responses.retrieve(final.id)
        assert kept.output_text == final.output_text
        conversation = client.conversations.create()
        client.responses.create(model="gpt-4o-mini", input="hi", conversation=conversation.id)
        assert len(client.conversations.items.list(conversation.id).data) == 2


def test_an_agents_sdk_user_gets_a_tool_loop_offline(demo_url: str) -> None:
    # Imported here: the SDK takes seconds to import, and only this test needs it.
    from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_provider import OpenAIProvider

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"sunny in {city}"

    async def main() -> Any:
        async with openai.AsyncOpenAI(base_url=demo_url, api_key="demo") as client:
            config = RunConfig(
                model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True
            )
            agent = Agent(name="Demo", model="gpt-4o-mini", tools=[get_weather])
            return await Runner.run(agent, "What is the weather in Lisbon?", run_config=config)

    result = asyncio.run(main())
    assert asked == ["Lisbon"]
    assert result.final_output == "The tool get_weather answered: sunny in Lisbon"
