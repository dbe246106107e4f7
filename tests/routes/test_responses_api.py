"""The Responses API, conversations and embeddings through the gateway: what it adds.

Relaying itself is proved by the real client libraries in tests/clients. Here:
ownership (tried as an attacker would), metering against what the upstream
billed, background mode, and clear answers for what is not offered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
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


_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's SDK clients are closed as it ends: an open connection left to the garbage
    collector warns (an error here) in whichever test happens to run then."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def _client(server: ServerThread, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    _CLIENTS.append(client)
    return client


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


def test_a_continued_response_is_reserved_its_new_images_on_top_of_the_window(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    """A response that continues stored context is reserved the model's whole window, and
    the images and PDF pages of its new input on top: gpt-4o-mini bills 48,169 tokens an image.

    Before, the window was all: two new images ($0.0145 on gpt-4o-mini) went unreserved,
    and a $0.03 budget let through a call that could cost $0.034.
    """
    key, _ = make_key(keyed.url, budget_usd="0.03")
    client = _client(keyed, key)
    first = client.responses.create(model=MODEL, input="hi", max_output_tokens=16)
    image = IMAGE
    hits = fake.hits
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [image, image]}],  # type: ignore[list-item]
            previous_response_id=first.id,
            max_output_tokens=16,
        )
    assert "budget" in str(caught.value)
    assert fake.hits == hits  # refused before anything was sent
    # The same continuation without the images fits: the window alone is $0.0192.
    follow = client.responses.create(
        model=MODEL, input="go on", previous_response_id=first.id, max_output_tokens=16
    )
    assert follow.output_text and fake.hits == hits + 1


IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo", "detail": "high"}


def _refused_after(call: Any, most: int = 10) -> int:
    """How many times `call` went through before a budget refused it."""
    for done in range(most):
        try:
            call()
        except openai.RateLimitError as refused:
            assert "budget" in str(refused)
            return done
    raise AssertionError(f"still admitted after {most} calls")


def _assert_billed_within_and_recorded(
    server: ServerThread, fake: FakeOpenAI, key_id: str, budget: Decimal, calls: int
) -> None:
    assert fake.biller.total <= budget, fake.biller.total
    _wait_for(lambda: _ledger(server, key_id)["requests"] == calls)
    totals = _ledger(server, key_id)
    billed = fake.biller.bills
    assert totals["prompt_tokens"] == sum(b.prompt_tokens for b in billed)
    assert totals["completion_tokens"] == sum(b.completion_tokens for b in billed)


def test_continuing_a_response_is_reserved_the_images_of_its_earlier_turns(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    """OpenAI reads, and bills, a stored response's images again each time it is continued.

    Before, a continuation was reserved the window alone ($0.0192 on gpt-4o-mini): with
    five images in the first turn ($0.036 each time they are read), three calls were
    billed $0.109 on a $0.10 budget.
    """
    budget = Decimal("0.10")
    key, key_id = make_key(keyed.url, budget_usd=str(budget))
    client = _client(keyed, key)
    fake.biller.clear()
    five = [{"role": "user", "content": [*[IMAGE] * 5, {"type": "input_text", "text": "look"}]}]
    latest = [client.responses.create(model=MODEL, input=five, max_output_tokens=16)]  # type: ignore[arg-type]

    def go_on() -> None:
        latest.append(
            client.responses.create(
                model=MODEL, input="and?", previous_response_id=latest[-1].id, max_output_tokens=16
            )
        )

    more = _refused_after(go_on)
    assert more >= 1  # continuing is possible, as long as the images are paid for
    assert all(bill.prompt_tokens > 5 * 48_000 for bill in fake.biller.bills)
    _assert_billed_within_and_recorded(keyed, fake, key_id, budget, 1 + more)


@pytest.mark.parametrize(
    "how", ["created with", "added to", "added by the master key to", "sent in a response of"]
)
def test_a_conversation_is_reserved_the_images_it_holds(
    keyed: ServerThread, fake: FakeOpenAI, how: str
) -> None:
    """A conversation's images are read and billed by every response in it.

    Before, reserved the window alone ($0.0192), a response in a conversation holding five
    images ($0.036 each time they are read) went through with $0.024 left: two responses
    were billed $0.072 on a $0.06 budget.
    """
    budget = Decimal("0.06")
    key, key_id = make_key(keyed.url, budget_usd=str(budget))
    client = _client(keyed, key)
    fake.biller.clear()
    message = {"type": "message", "role": "user", "content": [*[IMAGE] * 5]}
    if how == "created with":
        conversation = client.conversations.create(items=[message])  # type: ignore[list-item]
    else:
        conversation = client.conversations.create()
    if how == "added to":
        client.conversations.items.create(conversation.id, items=[message])  # type: ignore[list-item]
    elif how == "added by the master key to":  # a backend writing into its user's conversation
        _client(keyed, MASTER).conversations.items.create(conversation.id, items=[message])  # type: ignore[list-item]
    elif how == "sent in a response of":
        client.responses.create(
            model=MODEL,
            input=[message],
            conversation=conversation.id,
            max_output_tokens=16,  # type: ignore[list-item]
        )

    def go_on() -> None:
        client.responses.create(
            model=MODEL, input="and?", conversation=conversation.id, max_output_tokens=16
        )

    more = _refused_after(go_on)
    calls = more + (1 if how == "sent in a response of" else 0)
    assert calls >= 1
    _assert_billed_within_and_recorded(keyed, fake, key_id, budget, calls)


def _images_message(count: int) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [*[IMAGE] * count]}


@pytest.mark.parametrize("how", ["the client leaves", "the gateway times out"])
def test_a_conversation_counts_the_images_of_a_call_that_ended_early(
    gateway_factory: GatewayFactory, fake: FakeOpenAI, how: str
) -> None:
    """A call the client leaves (or the gateway stops waiting for) goes on upstream, and its
    images join the conversation all the same: they are counted before the call is sent.

    Before, counted once the answer was in: never, for such a call. Every later
    response in the conversation was reserved without ten images ($0.072 each time
    they are read): $0.145 billed on a $0.12 budget.
    """
    timeout = {"upstream_timeout": 0.5} if how == "the gateway times out" else {}
    server = gateway_factory(master_key=MASTER, **timeout)
    budget = Decimal("0.12")
    key, key_id = make_key(server.url, budget_usd=str(budget))
    client = _client(server, key)
    conversation = client.conversations.create()
    fake.biller.clear()
    fake.queue(Plan(first_chunk_delay=1.0))  # the model takes a second
    body = {"model": MODEL, "input": [_images_message(10)], "conversation": conversation.id}
    with pytest.raises((httpx.TimeoutException, httpx.HTTPStatusError)):
        answer = httpx.post(
            server.url + "/v1/responses",
            headers=auth(key),
            json={**body, "max_output_tokens": 16},
            timeout=0.3 if not timeout else 5,
        )
        answer.raise_for_status()  # the gateway's 504
    # The upstream finishes it anyway: the images are in the conversation now.
    _wait_for(lambda: len(fake.conversations.stored[conversation.id].items) >= 2)
    _wait_for(lambda: _ledger(server, key_id)["requests"] == 1)

    def go_on() -> None:
        client.responses.create(
            model=MODEL, input="and?", conversation=conversation.id, max_output_tokens=16
        )

    more = _refused_after(go_on)
    assert fake.biller.total <= budget, fake.biller.total
    _wait_for(lambda: _ledger(server, key_id)["requests"] == 1 + more)


def test_a_refused_call_adds_no_images_to_its_conversation(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    """A call refused before it is sent (its budget) leaves its conversation's count as it was:
    else each refused try would make the conversation dearer to continue."""
    key, _ = make_key(keyed.url, budget_usd="0.03")
    client = _client(keyed, key)
    conversation = client.conversations.create()
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):  # ten images: $0.072 at least
            client.responses.create(
                model=MODEL,
                input=[_images_message(10)],  # type: ignore[list-item]
                conversation=conversation.id,
                max_output_tokens=16,
            )
    # The window alone ($0.0192) fits what is left: no image was counted.
    answer = client.responses.create(
        model=MODEL, input="hi", conversation=conversation.id, max_output_tokens=16
    )
    assert answer.output_text


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
