"""The Responses API, conversations and embeddings through the gateway: what it adds.

Relaying itself is proved by the real client libraries in tests/clients. Here:
ownership (tried as an attacker would), metering against what the upstream
billed, background mode, and clear answers for what is not offered.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI, Plan
from tests.keys.conftest import MASTER, auth, make_key
from tests.servers import ServerThread

MODEL = "gpt-4o-mini"


@pytest.fixture
def keyed(gateway_factory: GatewayFactory) -> ServerThread:
    return gateway_factory(master_key=MASTER, background_poll_interval=0.05)


def _client(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _ledger(server: ServerThread, key_id: str) -> dict[str, Any]:
    answer = httpx.get(server.url + "/admin/usage", params={"key_id": key_id}, headers=auth(MASTER))
    totals: dict[str, Any] = answer.json()["totals"]
    return totals


def _wait_for(check: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


def test_another_keys_response_and_conversation_do_not_exist_for_it(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    alice_key, _ = make_key(keyed.url, name="alice")
    mallory_key, _ = make_key(keyed.url, name="mallory")
    alice, mallory = _client(keyed, alice_key), _client(keyed, mallory_key)
    response = alice.responses.create(model=MODEL, input="my secret plans")
    conversation = alice.conversations.create()
    hits = fake.hits
    attempts = [
        lambda: mallory.responses.retrieve(response.id),
        lambda: mallory.responses.input_items.list(response.id),
        lambda: mallory.responses.delete(response.id),
        lambda: mallory.responses.cancel(response.id),
        lambda: mallory.responses.create(
            model=MODEL, input="and then?", previous_response_id=response.id
        ),
        lambda: mallory.responses.create(model=MODEL, input="hi", conversation=conversation.id),
        lambda: mallory.conversations.retrieve(conversation.id),
        lambda: mallory.conversations.update(conversation.id, metadata={"x": "y"}),
        lambda: mallory.conversations.items.list(conversation.id),
        lambda: mallory.conversations.delete(conversation.id),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt()
    stolen = [{"type": "item_reference", "id": response.output[0].id}]
    with pytest.raises(openai.BadRequestError):  # an item id is a way in too
        mallory.responses.create(model=MODEL, input=stolen)  # type: ignore[arg-type]
    resume = httpx.get(
        keyed.url + f"/v1/responses/{response.id}",
        params={"stream": "true", "starting_after": "0"},
        headers=auth(mallory_key),
    )
    assert resume.status_code == 404 and resume.json()["error"]["code"] == "response_not_found"
    assert fake.hits == hits  # nothing of it reached the upstream
    # The owner, and the master key, still see everything.
    assert alice.responses.retrieve(response.id).id == response.id
    assert _client(keyed, MASTER).responses.retrieve(response.id).id == response.id
    follow = alice.responses.create(model=MODEL, input="go on", previous_response_id=response.id)
    assert follow.output_text
    alice.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(response.id)


def test_responses_are_metered_at_what_the_upstream_billed(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    key, key_id = make_key(keyed.url, budget_usd="5")
    client = _client(keyed, key)
    fake.biller.clear()
    client.responses.create(model=MODEL, input="hello", instructions="Be brief.")
    with client.responses.stream(model=MODEL, input="stream it") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    assert text
    client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    _wait_for(lambda: _ledger(keyed, key_id)["requests"] == 3)
    totals = _ledger(keyed, key_id)
    billed = fake.biller.bills
    assert len(billed) == 3
    assert totals["prompt_tokens"] == sum(b.prompt_tokens for b in billed)
    assert totals["completion_tokens"] == sum(b.completion_tokens for b in billed)


def test_a_background_response_holds_its_reservation_until_it_is_final(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    key, key_id = make_key(keyed.url, budget_usd="5")
    client = _client(keyed, key)
    fake.queue(Plan(queued_for=0.5))
    queued = client.responses.create(model=MODEL, input="take your time", background=True)
    assert queued.status in ("queued", "in_progress")
    assert _ledger(keyed, key_id)["requests"] == 0  # not settled while it runs
    # Nobody asks again: the gateway finds out by itself and settles at the real usage.
    _wait_for(lambda: _ledger(keyed, key_id)["requests"] == 1)
    bill = fake.biller.bills[-1]
    totals = _ledger(keyed, key_id)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    usage = httpx.get(keyed.url + "/usage", headers=auth(key)).json()["budget"]
    assert Decimal(str(usage["spent_usd"])) == pytest.approx(bill.cost, abs=Decimal("0.00001"))


def test_a_background_stream_the_client_leaves_is_billed_at_what_the_upstream_finished(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    """A background answer goes on upstream when its stream is dropped, and is billed in full.

    Before, the stream was settled as it was cut: what had been relayed so far
    (a few tokens), while the upstream wrote and billed the whole answer.
    """
    key, key_id = make_key(keyed.url, budget_usd="5")
    client = _client(keyed, key)
    fake.biller.clear()
    fake.queue(Plan(text="word " * 400, chunk_interval=0.002))
    with client.responses.create(
        model=MODEL, input="Write a story", background=True, stream=True
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                break  # the client leaves with one word of four hundred
    # Settled once the upstream says it is final, at what it billed.
    _wait_for(lambda: _ledger(keyed, key_id)["requests"] == 1)
    bill = fake.biller.bills[-1]
    _wait_for(lambda: bill.completion_tokens >= 400)  # the upstream wrote it all
    totals = _ledger(keyed, key_id)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    usage = httpx.get(keyed.url + "/usage", headers=auth(key)).json()["budget"]
    assert Decimal(str(usage["spent_usd"])) == pytest.approx(bill.cost, abs=Decimal("0.00001"))


def test_a_budget_refuses_a_response_that_cannot_fit_and_priced_tools(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    key, _ = make_key(keyed.url, budget_usd="0.001")
    client = _client(keyed, key)
    hits = fake.hits
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="gpt-4o", input="write a book")
    assert "max_tokens" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(
            model=MODEL, input="search", tools=[{"type": "web_search"}], max_output_tokens=5
        )
    assert fake.hits == hits


def test_embeddings_and_compaction_follow_the_field_policy(
    gateway_factory: GatewayFactory, fake: FakeOpenAI
) -> None:
    policy = {"user": "drop", "dimensions": "refuse", "stream_options": "refuse"}
    server = gateway_factory(field_policy=policy)
    embed = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    answer = httpx.post(server.url + "/v1/embeddings", json={**embed, "user": "u-1"})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 2
    sent = fake.last()
    assert sent.path == "/v1/embeddings" and sent.body == embed  # `user` dropped, the rest as sent
    compact = {"model": MODEL, "input": "a long talk", "user": "u-1"}
    assert httpx.post(server.url + "/v1/responses/compact", json=compact).status_code == 200
    assert fake.last().path == "/v1/responses/compact" and "user" not in fake.last().body
    hits = fake.hits
    refused = httpx.post(server.url + "/v1/embeddings", json={**embed, "dimensions": 8})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", "dimensions")
    assert fake.hits == hits  # refused before anything was sent
    # The simple API writes its own upstream body (with `stream_options`): not the client's.
    simple = httpx.post(server.url + "/chat/stream", json={"message": "hi"})
    assert simple.status_code == 200 and '"done":true' in simple.text


def test_what_is_not_offered_gets_an_openai_shaped_404_naming_what_is(
    gateway: ServerThread,
) -> None:
    answer = httpx.post(gateway.url + "/v1/completions", json={"prompt": "hi"})
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "unknown_url"
    assert "/v1/responses" in error["message"] and "/v1/embeddings" in error["message"]


def test_models_have_their_real_created_time_and_embedding_models_are_listed(
    gateway: ServerThread,
) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    assert client.models.retrieve("gpt-4o").created == 1715367049
    names = [model.id for model in client.models.list()]
    assert "text-embedding-3-small" in names
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-4o", input="a chat model cannot embed")
