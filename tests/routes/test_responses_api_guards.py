"""What a client key cannot reach through `/v1/responses` and `/v1/conversations`, tried as an
attacker would: item references in every form OpenAI accepts, ids that would leave their own
path upstream, and keys echoed back in a 404. Nothing of it may reach the upstream.
"""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.fakes.openai_server import FakeOpenAI
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


@pytest.mark.parametrize(
    "item",
    [
        "%252E%252E%252F%252E%252E%252Fconv_VICTIM%252Fitems",  # ../../conv_VICTIM/items
        "..%2F..%2Fconv_VICTIM",
        "x%3Fafter=1%26limit=100",  # a query of its own
        "..",  # the conversation itself
        "x%23y",
        "msg_" + "a" * 130,
    ],
)
def test_ids_that_would_leave_their_path_upstream_are_404_and_never_sent(
    keyed: ServerThread, fake: FakeOpenAI, item: str
) -> None:
    key, _ = make_key(keyed.url)
    created = httpx.post(keyed.url + "/v1/conversations", json={}, headers=auth(key))
    own = created.json()["id"]
    arrived = len(fake.arrived)  # every request, even one the fake has no route for
    for caller in (key, MASTER):  # not even the master key: the id is not an id
        for method, path in [
            ("DELETE", f"/v1/conversations/{own}/items/{item}"),
            ("GET", f"/v1/conversations/{own}/items/{item}"),
            ("GET", f"/v1/conversations/{item}"),
            ("DELETE", f"/v1/conversations/{item}"),
            ("GET", f"/v1/responses/{item}"),
            ("DELETE", f"/v1/responses/{item}"),
            ("POST", f"/v1/responses/{item}/cancel"),
            ("GET", f"/v1/responses/{item}/input_items"),
        ]:
            status, body = _raw(keyed, method, path, caller)
            assert status == 404, (method, path, status, body)
    assert fake.arrived[arrived:] == []
    # The conversation and its id are untouched, and a well-made id still goes through.
    assert httpx.get(keyed.url + f"/v1/conversations/{own}", headers=auth(key)).status_code == 200
    assert fake.last().path == f"/v1/conversations/{own}"


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
