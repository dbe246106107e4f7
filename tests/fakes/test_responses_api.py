"""The fake upstream's Responses API on the wire: OpenAI's shapes, order and misbehaviour.

Every object and event is validated against the official openai SDK's
pydantic types; the real client libraries run against it in tests/clients.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types import CreateEmbeddingResponse, Model
from openai.types.conversations import Conversation, ConversationItemList
from openai.types.responses import (
    InputTokenCountResponse,
    Response,
    ResponseCompactionItem,
    ResponseItemList,
    ResponseStreamEvent,
    ResponseUsage,
)
from pydantic import TypeAdapter

from tests.clients.conftest import WEATHER_CALL, WEATHER_TOOL
from tests.fakes.openai_server import DEFAULT_TEXT, FakeOpenAI, Plan

EVENT = TypeAdapter[Any](ResponseStreamEvent)
TEXT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(DEFAULT_TEXT.split(" ")),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def http(fake: FakeOpenAI, upstream_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    with httpx.Client(base_url=upstream_url, headers=headers, timeout=10) as client:
        yield client


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse an SSE body, checking OpenAI's framing: `event:` names the data's type."""
    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(lines) == {"event", "data"}, block
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        EVENT.validate_python(data)
        parsed.append(data)
    return parsed


def stream(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    return events(http.post("/responses", json={**body, "stream": True}))


def test_a_stream_has_openais_events_in_order_numbered_and_billed(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    got = stream(http, {"model": "gpt-4o-mini", "input": "Say hello"})
    assert [e["type"] for e in got] == TEXT_ORDER
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert "".join(e["delta"] for e in got if e["type"].endswith(".delta")) == DEFAULT_TEXT
    final = Response.model_validate(got[-1]["response"])
    assert final.status == "completed" and final.output_text == DEFAULT_TEXT
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["usage"] is None
    (bill,) = fake.biller.bills
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    assert final.usage.total_tokens == bill.prompt_tokens + bill.completion_tokens
    # Stored: the same object comes back, and so do the input items.
    again = http.get(f"/responses/{final.id}").json()
    assert Response.model_validate(again) == final
    items = ResponseItemList.model_validate(http.get(f"/responses/{final.id}/input_items").json())
    assert [i.type for i in items.data] == ["message"]


def test_a_function_call_streams_its_arguments_when_tools_are_given(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]))
    got = stream(http, {"model": "gpt-4o", "input": "Weather in Paris?", "tools": [WEATHER_TOOL]})
    kinds = [e["type"] for e in got]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    final = Response.model_validate(got[-1]["response"])
    (item,) = final.output
    assert item.type == "function_call"
    assert (item.call_id, item.name, json.loads(item.arguments)) == (
        WEATHER_CALL["call_id"],
        "get_weather",
        {"city": "Paris"},
    )
    # The tool result continues the same thread; a result for an unknown call is refused.
    answer = http.post(
        "/responses",
        json={
            "model": "gpt-4o",
            "previous_response_id": final.id,
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": WEATHER_CALL["call_id"],
                    "output": "sunny",
                }
            ],
        },
    )
    assert answer.status_code == 200 and Response.model_validate(answer.json()).output_text
    orphan = http.post(
        "/responses",
        json={
            "model": "gpt-4o",
            "input": [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}],
        },
    )
    assert orphan.status_code == 400 and "call_nope" in orphan.json()["error"]["message"]


def test_a_tool_plan_without_tools_in_the_request_answers_text(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(tool_calls=[WEATHER_CALL]))
    answer = Response.model_validate(http.post("/responses", json={"model": "gpt-4o"}).json())
    assert answer.output_text == DEFAULT_TEXT


def test_previous_responses_are_read_and_billed_again(http: httpx.Client, fake: FakeOpenAI) -> None:
    first = http.post("/responses", json={"model": "gpt-4o-mini", "input": "one"}).json()
    body = {"model": "gpt-4o-mini", "input": "two", "previous_response_id": first["id"]}
    count = http.post("/responses/input_tokens", json=body).json()
    InputTokenCountResponse.model_validate(count)
    second = http.post("/responses", json=body).json()
    assert second["previous_response_id"] == first["id"]
    bills = fake.biller.bills
    assert bills[1].prompt_tokens == second["usage"]["input_tokens"] == count["input_tokens"]
    assert bills[1].prompt_tokens > bills[0].prompt_tokens + len(DEFAULT_TEXT)
    missing = http.post("/responses", json={**body, "previous_response_id": "resp_nope"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "previous_response_not_found"
    assert missing.json()["error"]["param"] == "previous_response_id"


def test_an_item_reference_reads_a_stored_item(http: httpx.Client, fake: FakeOpenAI) -> None:
    first = http.post("/responses", json={"model": "gpt-4o", "input": "a secret"}).json()
    (stored_item,) = http.get(f"/responses/{first['id']}/input_items").json()["data"]
    answer_id = first["output"][0]["id"]
    body = {
        "model": "gpt-4o",
        "input": [
            {"type": "item_reference", "id": stored_item["id"]},
            {"type": "item_reference", "id": answer_id},
        ],
    }
    second = http.post("/responses", json=body).json()
    (first_bill, second_bill) = fake.biller.bills
    # The referenced items are read (and billed) as if they had been sent.
    assert second_bill.prompt_tokens > first_bill.prompt_tokens + len(DEFAULT_TEXT)
    listed = http.get(f"/responses/{second['id']}/input_items", params={"order": "asc"}).json()
    assert [i["id"] for i in listed["data"]] == [stored_item["id"], answer_id]
    missing = {"model": "gpt-4o", "input": [{"type": "item_reference", "id": "msg_nope"}]}
    refused = http.post("/responses", json=missing)
    assert refused.status_code == 400 and "msg_nope" in refused.json()["error"]["message"]


def test_store_false_keeps_nothing_and_delete_forgets(http: httpx.Client) -> None:
    unstored = http.post("/responses", json={"model": "gpt-4o", "store": False}).json()
    assert http.get(f"/responses/{unstored['id']}").status_code == 404
    kept = http.post("/responses", json={"model": "gpt-4o"}).json()
    deleted = http.delete(f"/responses/{kept['id']}")
    assert deleted.json() == {"id": kept["id"], "object": "response", "deleted": True}
    gone = http.get(f"/responses/{kept['id']}")
    assert gone.status_code == 404
    assert gone.json()["error"]["message"] == f"Response with id '{kept['id']}' not found."


def _poll(http: httpx.Client, response_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        body: dict[str, Any] = http.get(f"/responses/{response_id}").json()
        if body["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return body
        time.sleep(0.01)


def test_background_responses_return_at_once_and_finish_on_their_own(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(queued_for=0.05))
    created = http.post("/responses", json={"model": "gpt-4o", "background": True}).json()
    assert created["status"] == "queued" and created["background"] is True
    done = Response.model_validate(_poll(http, created["id"]))
    assert done.status == "completed" and done.output_text == DEFAULT_TEXT
    assert (
        done.usage is not None
        and done.usage.output_tokens == fake.biller.bills[0].completion_tokens
    )
    # It can be cancelled only while it runs; a finished one comes back as it is.
    assert http.post(f"/responses/{created['id']}/cancel").json()["status"] == "completed"
    plain = http.post("/responses", json={"model": "gpt-4o"}).json()
    assert http.post(f"/responses/{plain['id']}/cancel").status_code == 400
    refused = http.post("/responses", json={"model": "gpt-4o", "background": True, "store": False})
    assert refused.status_code == 400


def test_cancelling_a_running_background_response_stops_its_bill(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(chunk_interval=0.05))
    created = http.post("/responses", json={"model": "gpt-4o", "background": True}).json()
    cancelled = http.post(f"/responses/{created['id']}/cancel").json()
    assert Response.model_validate(cancelled).status == "cancelled"
    billed = fake.biller.bills[0].completion_tokens
    assert billed < len(DEFAULT_TEXT.split(" "))
    time.sleep(0.15)  # the fake's own clock: nothing more is generated
    assert fake.biller.bills[0].completion_tokens == billed
    assert http.post(f"/responses/{created['id']}/cancel").json()["status"] == "cancelled"


def test_a_dropped_background_stream_resumes_after_the_last_event_seen(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(drop_after_chunks=6))
    body = {"model": "gpt-4o", "background": True, "stream": True, "input": "long"}
    seen = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/responses", json=body) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    assert [e["type"] for e in seen[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert seen[0]["response"]["status"] == "queued"
    response_id, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    rest = events(
        http.get(f"/responses/{response_id}", params={"stream": "true", "starting_after": last})
    )
    assert [e["sequence_number"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in seen + rest if e["type"] == "response.output_text.delta")
    assert text == DEFAULT_TEXT
    whole = events(http.get(f"/responses/{response_id}", params={"stream": "true"}))
    assert whole[0]["sequence_number"] == 0 and whole[-1] == rest[-1]
    plain = http.post("/responses", json={"model": "gpt-4o"}).json()
    assert http.get(f"/responses/{plain['id']}", params={"stream": "true"}).status_code == 400


def test_a_client_that_leaves_is_billed_for_what_was_made(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(chunk_interval=0.05))
    body = {"model": "gpt-4o", "stream": True}
    with http.stream("POST", "/responses", json=body) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    deadline = time.monotonic() + 5
    while not fake.last().closed_early.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.15)
    billed = fake.biller.bills[0].completion_tokens
    assert 1 <= billed < len(DEFAULT_TEXT.split(" "))


@pytest.mark.parametrize(
    ("plan", "last_type", "status"),
    [
        (Plan(error_event_after_chunks=5), "error", None),
        (Plan(failed_after_chunks=5), "response.failed", "failed"),
        (Plan(finish_reason="length"), "response.incomplete", "incomplete"),
        (Plan(omit_done=True), "response.output_item.done", None),
    ],
)
def test_streams_end_as_the_plan_says(
    http: httpx.Client, fake: FakeOpenAI, plan: Plan, last_type: str, status: str | None
) -> None:
    fake.queue(plan)
    got = stream(http, {"model": "gpt-4o"})
    assert got[-1]["type"] == last_type
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    if status is not None:
        final = Response.model_validate(got[-1]["response"])
        assert final.status == status and final.usage is not None
        assert final.usage.output_tokens == fake.biller.bills[0].completion_tokens
    if last_type == "error":
        assert got[-1]["code"] == "server_error" and got[-1]["message"]


def test_max_output_tokens_cuts_the_answer_and_too_small_a_limit_is_refused(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(text=" ".join(["word"] * 40)))
    cut = http.post("/responses", json={"model": "gpt-4o", "max_output_tokens": 16}).json()
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["usage"]["output_tokens"] == 16 == fake.biller.bills[0].completion_tokens
    small = http.post("/responses", json={"model": "gpt-4o", "max_output_tokens": 5})
    assert small.status_code == 400 and small.json()["error"]["param"] == "max_output_tokens"


def test_reasoning_and_cached_tokens_show_in_the_usage(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.queue(Plan(reasoning_tokens=30, cached_tokens=2))
    got = stream(http, {"model": "gpt-5", "input": "think"})
    final = Response.model_validate(got[-1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.usage is not None
    assert final.usage.output_tokens_details.reasoning_tokens == 30
    assert final.usage.output_tokens == 30 + len(DEFAULT_TEXT.split(" "))
    assert final.usage.input_tokens_details.cached_tokens == 2


def test_plans_reach_the_endpoint_they_name(http: httpx.Client, fake: FakeOpenAI) -> None:
    fake.queue(Plan(status=500, endpoint="responses.retrieve"), Plan(status=429))
    limited = http.post("/responses", json={"model": "gpt-4o"})
    assert limited.status_code == 429  # the model call took the plan without an endpoint
    created = http.post("/responses", json={"model": "gpt-4o"}).json()
    assert http.get(f"/responses/{created['id']}").status_code == 500
    assert http.get(f"/responses/{created['id']}").status_code == 200
    wrong_key = httpx.post(str(http.base_url).rstrip("/") + "/responses", json={"model": "gpt-4o"})
    assert wrong_key.status_code == 401


def test_compaction_keeps_the_user_turns_and_one_compaction_item(http: httpx.Client) -> None:
    first = http.post("/responses", json={"model": "gpt-4o", "input": "remember 42"}).json()
    body = {"model": "gpt-4o", "previous_response_id": first["id"], "input": "and 43"}
    compacted = http.post("/responses/compact", json=body).json()
    # OpenAI's reference: "all user messages, followed by a single compaction item". The
    # SDK types `output` as output items, which have no user role, so check the parts.
    assert compacted["object"] == "response.compaction"
    *users, last = compacted["output"]
    assert [(u["role"], u["content"][0]["text"]) for u in users] == [
        ("user", "remember 42"),
        ("user", "and 43"),
    ]
    ResponseCompactionItem.model_validate(last)
    ResponseUsage.model_validate(compacted["usage"])


def test_conversations_collect_the_turns_of_their_responses(http: httpx.Client) -> None:
    made = http.post(
        "/conversations",
        json={
            "metadata": {"topic": "demo"},
            "items": [{"type": "message", "role": "user", "content": "Hello"}],
        },
    ).json()
    conv = Conversation.model_validate(made)
    answer = http.post(
        "/responses", json={"model": "gpt-4o", "conversation": conv.id, "input": "Next"}
    ).json()
    assert answer["conversation"] == {"id": conv.id}
    listed = ConversationItemList.model_validate(
        http.get(f"/conversations/{conv.id}/items", params={"order": "asc"}).json()
    )
    assert [(i.type, getattr(i, "role", None)) for i in listed.data] == [
        ("message", "user"),
        ("message", "user"),
        ("message", "assistant"),
    ]
    added = http.post(
        f"/conversations/{conv.id}/items",
        json={"items": [{"type": "message", "role": "user", "content": "More"}]},
    ).json()
    (new,) = ConversationItemList.model_validate(added).data
    assert http.get(f"/conversations/{conv.id}/items/{new.id}").json()["id"] == new.id
    assert http.delete(f"/conversations/{conv.id}/items/{new.id}").json()["id"] == conv.id
    assert http.get(f"/conversations/{conv.id}/items/{new.id}").status_code == 404
    updated = http.post(f"/conversations/{conv.id}", json={"metadata": {"topic": "new"}}).json()
    assert updated["metadata"] == {"topic": "new"}
    assert http.delete(f"/conversations/{conv.id}").json() == {
        "id": conv.id,
        "object": "conversation.deleted",
        "deleted": True,
    }
    assert http.get(f"/conversations/{conv.id}").status_code == 404
    gone = http.post("/responses", json={"model": "gpt-4o", "conversation": conv.id})
    assert gone.status_code == 404


def test_embeddings_are_deterministic_unit_vectors_in_both_encodings(
    http: httpx.Client, fake: FakeOpenAI
) -> None:
    body = {"model": "text-embedding-3-small", "input": ["héllo", "world"]}
    floats = CreateEmbeddingResponse.model_validate(http.post("/embeddings", json=body).json())
    assert [len(d.embedding) for d in floats.data] == [1536, 1536]
    assert math.isclose(sum(x * x for x in floats.data[0].embedding), 1.0)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 6 + 5
    assert fake.biller.bills[0].prompt_tokens == 11
    again = http.post("/embeddings", json=body).json()
    assert again["data"][0]["embedding"] == floats.data[0].embedding
    packed = http.post("/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-6)
    short = http.post("/embeddings", json={**body, "dimensions": 256}).json()["data"][0]
    assert len(short["embedding"]) == 256
    assert math.isclose(sum(x * x for x in short["embedding"]), 1.0)
    ada = {"model": "text-embedding-ada-002", "input": "x", "dimensions": 8}
    assert http.post("/embeddings", json=ada).status_code == 400
    assert http.post("/embeddings", json={**body, "input": ""}).status_code == 400
    assert http.post("/embeddings", json={**body, "model": "gpt-4o"}).status_code == 404


def test_model_pages_have_real_creation_times(http: httpx.Client) -> None:
    model = Model.model_validate(http.get("/models/gpt-4o-mini").json())
    assert model.created == 1721172741
    missing = http.get("/models/gpt-0")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
