"""What a client key cannot reach through `/v1/responses` and `/v1/conversations`, tried as an
attacker would: item references in every form OpenAI accepts, ids that would leave their own
path upstream, and keys echoed back in a 404. Nothing of it may reach the upstream as such.
And what must still work: a proxy's ids, which are not shaped like OpenAI's.
"""

from __future__ import annotations

import base64
import http.client
import itertools
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.fakes import conversations_api as fake_conversations
from tests.fakes import responses_api as fake_responses
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.responses_events import new_id
from tests.keys.conftest import MASTER, auth, make_key
from tests.servers import ServerThread

MODEL = "gpt-4o-mini"
REFUSED = "An 'item_reference' cannot be used with a client key: send the item itself."
# OpenAI's `ItemReference.type` is optional: these are all references to a stored item.
REFERENCES: list[dict[str, Any]] = [
    {"type": "item_reference", "id": "msg_of_another_key"},
    {"id": "msg_of_another_key"},
    {"type": None, "id": "msg_of_another_key"},
    {"type": None, "id": "msg_of_another_key", "role": None},
]


@pytest.fixture
def keyed(gateway_factory: GatewayFactory) -> ServerThread:
    return gateway_factory(master_key=MASTER)


def _raw(server: ServerThread, method: str, path: str, key: str) -> tuple[int, bytes]:
    """A request with its path exactly as written: httpx would resolve `..` itself."""
    place = urlsplit(server.url)
    connection = http.client.HTTPConnection(place.hostname or "", place.port, timeout=10)
    try:
        connection.request(method, path, headers=auth(key))
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


@pytest.mark.parametrize("reference", REFERENCES)
def test_an_item_reference_in_any_form_is_refused_for_a_client_key(
    keyed: ServerThread, fake: FakeOpenAI, reference: dict[str, Any]
) -> None:
    key, _ = make_key(keyed.url)
    with httpx.Client(base_url=keyed.url + "/v1", headers=auth(key), timeout=10) as http:
        own = http.post("/conversations", json={}).json()["id"]
        hits = fake.hits
        attempts = [
            http.post("/responses", json={"model": MODEL, "input": [reference]}),
            http.post("/responses/input_tokens", json={"model": MODEL, "input": [reference]}),
            http.post("/conversations", json={"items": [reference]}),
            http.post(f"/conversations/{own}/items", json={"items": [reference]}),
        ]
        for answer in attempts:
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["message"] == REFUSED
        assert fake.hits == hits  # nothing reached the upstream
        # An item sent as itself still goes, with or without its type.
        message = {"role": "user", "content": "hi"}
        assert http.post("/responses", json={"model": MODEL, "input": [message]}).is_success
        added = http.post(f"/conversations/{own}/items", json={"items": [message]})
        assert added.is_success, added.text


def test_the_master_key_may_still_send_item_references(
    keyed: ServerThread, fake: FakeOpenAI
) -> None:
    with httpx.Client(base_url=keyed.url + "/v1", headers=auth(MASTER), timeout=10) as http:
        first = http.post("/responses", json={"model": MODEL, "input": "hi"}).json()
        reference = {"type": "item_reference", "id": first["output"][0]["id"]}
        answer = http.post("/responses", json={"model": MODEL, "input": [reference]})
        assert answer.status_code == 200, answer.text
        assert http.post("/conversations", json={"items": [reference]}).status_code == 200


# Ids that would leave their own path if sent as they are, as a client puts them in its path
# (the server decodes `%XX` once), and the id the gateway is then given.
ESCAPES = {
    "%252E%252E%252F%252E%252E%252Fconv_VICTIM%252Fitems": "%2E%2E%2F%2E%2E%2Fconv_VICTIM%2Fitems",
    "x%3Fafter=1%26limit=100": "x?after=1&limit=100",  # a query of its own
    "x%23y": "x#y",
}
# No id at all: a path's dot segments (alone, or between `/`: a proxy before the upstream
# that decodes `%2F` would resolve them), a space, a control character, more than 512.
NOT_IDS = ["..", ".", "..%2F..%2Fconv_VICTIM", "x%2F.%2Fy", "x%20y", "x%00y", "x%7Fy"]
NOT_IDS.append("msg_" + "a" * 509)


def _attempts(own: str, item: str) -> list[tuple[str, str, list[str]]]:
    """Each call with `item` as an id: method, the gateway path, the upstream path's segments."""
    return [
        ("DELETE", f"/v1/conversations/{own}/items/{item}", ["conversations", own, "items"]),
        ("GET", f"/v1/conversations/{own}/items/{item}", ["conversations", own, "items"]),
        ("GET", f"/v1/conversations/{item}", ["conversations"]),
        ("DELETE", f"/v1/conversations/{item}", ["conversations"]),
        ("GET", f"/v1/responses/{item}", ["responses"]),
        ("DELETE", f"/v1/responses/{item}", ["responses"]),
        ("POST", f"/v1/responses/{item}/cancel", ["responses", "", "cancel"]),
        ("GET", f"/v1/responses/{item}/input_items", ["responses", "", "input_items"]),
    ]


def _segments(arrived: str) -> tuple[str, list[str]]:
    """An upstream request's method and its path's segments after `/v1`, each decoded."""
    method, _, path = arrived.partition(" ")
    return method, [unquote(part) for part in path.removeprefix("/v1/").split("/")]


def _upstream(segments: list[str], object_id: str) -> list[str]:
    """Where `object_id` goes: in the blank segment, else after the last one."""
    if "" in segments:
        return [object_id if part == "" else part for part in segments]
    return [*segments, object_id]


@pytest.mark.parametrize("item", list(ESCAPES))
def test_ids_that_would_leave_their_path_go_upstream_as_one_segment(
    keyed: ServerThread, fake: FakeOpenAI, item: str
) -> None:
    key, _ = make_key(keyed.url)
    created = httpx.post(keyed.url + "/v1/conversations", json={}, headers=auth(key))
    own = created.json()["id"]
    arrived = len(fake.arrived)  # every request, even one the fake has no route for
    expected = []
    for caller in (key, MASTER):
        for method, path, upstream in _attempts(own, item):
            status, body = _raw(keyed, method, path, caller)
            assert status == 404, (method, path, status, body)  # nobody has such an object
            if caller == MASTER or own in path:  # else not the key's own: never sent
                expected.append((method, _upstream(upstream, ESCAPES[item])))
    sent = fake.arrived[arrived:]
    # Each went as one segment holding the whole id: no `..` resolved, no query, no fragment.
    assert [_segments(line) for line in sent] == expected
    assert all("?" not in line and "#" not in line for line in sent)
    # The conversation and its id are untouched, and a well-made id still goes through.
    assert httpx.get(keyed.url + f"/v1/conversations/{own}", headers=auth(key)).status_code == 200
    assert fake.last().path == f"/v1/conversations/{own}"


@pytest.mark.parametrize("item", NOT_IDS)
def test_what_is_no_id_is_404_and_never_sent(
    keyed: ServerThread, fake: FakeOpenAI, item: str
) -> None:
    key, _ = make_key(keyed.url)
    created = httpx.post(keyed.url + "/v1/conversations", json={}, headers=auth(key))
    own = created.json()["id"]
    arrived = len(fake.arrived)
    for caller in (key, MASTER):  # not even the master key: it is not an id
        for method, path, _ in _attempts(own, item):
            status, body = _raw(keyed, method, path, caller)
            assert status == 404, (method, path, status, body)
        given = unquote(item)  # as a body gives it: the same check
        with httpx.Client(base_url=keyed.url + "/v1", headers=auth(caller), timeout=10) as http:
            for field in ("previous_response_id", "conversation"):
                answer = http.post("/responses", json={"model": MODEL, "input": "hi", field: given})
                assert answer.status_code == 404, (field, answer.text)
    assert fake.arrived[arrived:] == []


def _proxy_id(prefix: str, n: int) -> str:
    """An id as LiteLLM's proxy makes it: the prefix, then standard base64 of where it lives."""
    where = (
        f"litellm:custom_llm_provider:openai;model_id:9f0c2a4e-{n:04d}-4b6e-8c1d-2e7f5a9b3c60;"
        f"response_id:{prefix}_68b1f0c2a8e48190a3b7c9d1e2f3a4b5c6d7e8f9"
    ).encode() + b"\xfb\xef\xff\xfb"  # `++//+w==` at its end
    return f"{prefix}_{base64.b64encode(where).decode()}"


def test_a_proxys_base64_ids_round_trip(
    keyed: ServerThread, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LiteLLM answers `resp_` + base64 (`+ / =`, ~200 characters): each is owned and found."""
    made = itertools.count()

    def proxy_ids(prefix: str) -> str:
        return _proxy_id(prefix, next(made)) if prefix in ("resp", "conv") else new_id(prefix)

    # The fake makes its responses' and conversations' ids as the proxy does.
    monkeypatch.setattr(fake_responses, "new_id", proxy_ids)
    monkeypatch.setattr(fake_conversations, "new_id", proxy_ids)
    key, _ = make_key(keyed.url)
    other, _ = make_key(keyed.url)
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
    first = client.responses.create(model=MODEL, input="hi")
    assert "+" in first.id and "/" in first.id and first.id.endswith("=") and len(first.id) > 190
    assert client.responses.retrieve(first.id).output_text == first.output_text
    assert _segments(fake.arrived[-1]) == ("GET", ["responses", first.id])
    second = client.responses.create(model=MODEL, input="and?", previous_response_id=first.id)
    assert fake.last().body["previous_response_id"] == first.id
    assert [item.id for item in client.responses.input_items.list(second.id).data]
    with client.responses.stream(model=MODEL, input="go on", previous_response_id=second.id) as s:
        streamed = s.get_final_response()
    assert "/" in streamed.id and client.responses.retrieve(streamed.id).id == streamed.id
    conversation = client.conversations.create(items=[{"role": "user", "content": "hi"}])
    assert "/" in conversation.id
    in_it = client.responses.create(model=MODEL, input="more", conversation=conversation.id)
    items = client.conversations.items.list(conversation.id).data
    assert client.conversations.items.retrieve(items[0].id, conversation_id=conversation.id)
    assert client.conversations.retrieve(conversation.id).id == conversation.id
    # Still each key's own: another key is told they do not exist, and nothing is sent.
    stranger = openai.OpenAI(base_url=keyed.url + "/v1", api_key=other, max_retries=0)
    hits = fake.hits
    for attempt in (
        lambda: stranger.responses.retrieve(in_it.id),
        lambda: stranger.responses.create(model=MODEL, input="x", previous_response_id=first.id),
        lambda: stranger.conversations.retrieve(conversation.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert fake.hits == hits
    assert client.responses.delete(first.id) is None
    assert client.conversations.delete(conversation.id).deleted


def test_a_404_does_not_echo_a_key_sent_as_an_id(keyed: ServerThread, fake: FakeOpenAI) -> None:
    key, _ = make_key(keyed.url)
    with httpx.Client(base_url=keyed.url + "/v1", headers=auth(key), timeout=10) as http:
        answers = [
            http.get(f"/responses/{key}"),
            http.get(f"/conversations/{MASTER}"),
            http.get(f"/models/{key}"),
            http.post("/responses", json={"model": MODEL, "previous_response_id": key}),
        ]
    for answer in answers:
        assert answer.status_code == 404, answer.text
        assert key not in answer.text and key[4:] not in answer.text
        assert MASTER not in answer.text
        assert "[redacted]" in answer.json()["error"]["message"]
