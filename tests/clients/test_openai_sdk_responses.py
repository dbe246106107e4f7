"""openai-python's responses, conversations, embeddings and models, as a user calls them."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from tests.clients.conftest import (
    FINAL_ANSWER,
    MODEL,
    WEATHER_CALL,
    WEATHER_TOOL,
    arguments,
    tool_outputs,
    weather,
)
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan


@pytest.fixture
def client(responses_base_url: str, responses_api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=responses_base_url, api_key=responses_api_key) as sdk:
        yield sdk


def test_create_retrieve_input_items_and_delete(client: openai.OpenAI) -> None:
    created = client.responses.create(model=MODEL, input="Say hello", instructions="Be brief.")
    assert created.status == "completed"
    assert created.output_text == DEFAULT_TEXT
    assert created.usage is not None and created.usage.output_tokens > 0
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == DEFAULT_TEXT
    items = list(client.responses.input_items.list(created.id))
    assert len(items) == 1 and items[0].type == "message"
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_stream_gives_text_deltas_and_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == DEFAULT_TEXT == final.output_text
    assert len(deltas) > 1
    assert final.usage is not None and final.usage.total_tokens > 0


def test_raw_create_stream_ends_with_response_completed(client: openai.OpenAI) -> None:
    kinds = [e.type for e in client.responses.create(model=MODEL, input="hi", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_a_function_tool_loop_with_previous_response_id(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]), Plan(text=FINAL_ANSWER))
    first = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER_TOOL]
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and arguments(call.arguments) == {"city": "Paris"}
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=[WEATHER_TOOL],
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": weather(**arguments(call.arguments)),
            }
        ],
    )
    assert second.output_text == FINAL_ANSWER
    assert second.previous_response_id == first.id
    assert tool_outputs(fake)[-1]["output"] == weather("Paris")


def test_a_background_stream_left_early_is_resumed_where_it_stopped(
    client: openai.OpenAI,
) -> None:
    seen = []
    with client.responses.create(
        model=MODEL, input="Write a story", background=True, stream=True
    ) as stream:
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break  # the connection drops here
    assert seen[0].type == "response.created" and seen[0].response.status == "queued"
    response_id, cursor = seen[0].response.id, seen[-1].sequence_number
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=cursor))
    assert resumed[0].sequence_number == cursor + 1
    assert resumed[-1].type == "response.completed"
    deltas = [e.delta for e in [*seen, *resumed] if e.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_TEXT
    polled = client.responses.retrieve(response_id)
    assert polled.status == "completed" and polled.output_text == DEFAULT_TEXT
    assert client.responses.cancel(response_id).status == "completed"  # done: unchanged


def test_cancel_a_background_response(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.queue(Plan(queued_for=5))
    created = client.responses.create(model=MODEL, input="Write a story", background=True)
    assert client.responses.cancel(created.id).status == "cancelled"
    assert client.responses.retrieve(created.id).status == "cancelled"


def test_input_tokens_and_compaction(client: openai.OpenAI) -> None:
    count = client.responses.input_tokens.count(model=MODEL, input="How many tokens is this?")
    assert count.object == "response.input_tokens" and count.input_tokens > 0
    first = client.responses.create(model=MODEL, input="Remember the number 42.")
    compacted = client.responses.compact(model=MODEL, previous_response_id=first.id)
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"


def test_a_conversation_keeps_the_turns(client: openai.OpenAI) -> None:
    conversation = client.conversations.create(metadata={"topic": "greetings"})
    client.responses.create(model=MODEL, input="Hello", conversation=conversation.id)
    answer = client.responses.create(model=MODEL, input="Again", conversation=conversation.id)
    assert answer.output_text == DEFAULT_TEXT
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [getattr(item, "role", None) for item in items] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    updated = client.conversations.update(conversation.id, metadata={"topic": "farewells"})
    assert updated.metadata == {"topic": "farewells"}
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_embeddings_create(client: openai.OpenAI) -> None:
    # The SDK asks for base64 and decodes it; the user sees floats.
    result = client.embeddings.create(
        model="text-embedding-3-small", input=["a cat", "a dog"], dimensions=64
    )
    first, second = (item.embedding for item in result.data)
    assert len(first) == len(second) == 64
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5)
    assert first != second
    assert result.usage.prompt_tokens > 0
    again = client.embeddings.create(model="text-embedding-3-small", input="a cat", dimensions=64)
    assert again.data[0].embedding == first


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.created > 1_600_000_000
