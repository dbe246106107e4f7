"""The fake upstream's conversations, embeddings and model pages, as OpenAI documents them.

- `/v1/conversations` create, retrieve, update (metadata), delete, and
  `/v1/conversations/{id}/items` list, create, retrieve, delete. A response
  created with `conversation` reads its items first and, once done, appends
  its input and output to it (tests/fakes/responses_api.py).
- `POST /v1/embeddings`: a deterministic unit vector per input (seeded by its
  hash), shortened and renormalised for `dimensions` as OpenAI does, as floats
  or base64 little-endian float32; usage billed one token per byte of text (or
  per token of a token array).
- `GET /v1/models/{id}`: the models the fake knows, with their real `created`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.responses_api import Refusal, _json, normalize_input, not_found, page
from tests.fakes.responses_events import Call, new_id

Handler = Callable[[Call], Awaitable[None]]
Route = tuple[str, str, str, Handler]

MAX_CREATE_ITEMS = 20  # OpenAI: at most 20 items when creating a conversation
EMBEDDING_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
# id: (created, owned_by), as OpenAI's GET /v1/models/{id} reports them.
MODELS = {
    "gpt-4o": (1715367049, "system"),
    "gpt-4o-mini": (1721172741, "system"),
    "gpt-4": (1687882411, "openai"),
    "gpt-4-turbo": (1712361441, "system"),
    "gpt-3.5-turbo": (1677610602, "openai"),
    "o1-mini": (1725649008, "system"),
    "o1-preview": (1725648897, "system"),
    "gpt-4.1": (1744316542, "system"),
    "gpt-5": (1754425777, "system"),
    "text-embedding-3-small": (1705948997, "system"),
    "text-embedding-3-large": (1705953180, "system"),
    "text-embedding-ada-002": (1671217299, "openai-internal"),
}


@dataclass
class StoredConversation:
    obj: dict[str, Any]
    items: list[dict[str, Any]]


class ConversationsAPI:
    """Conversations and their items, embeddings, and model pages."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.stored: dict[str, StoredConversation] = {}

    def routes(self) -> list[Route]:
        conv = r"/v1/conversations/(?P<id>[^/]+)"
        return [
            ("POST", r"/v1/conversations", "conversations.create", self.create),
            ("GET", conv, "conversations.retrieve", self.retrieve),
            ("POST", conv, "conversations.update", self.update),
            ("DELETE", conv, "conversations.delete", self.delete),
            ("GET", conv + "/items", "conversations.items.list", self.list_items),
            ("POST", conv + "/items", "conversations.items.create", self.create_items),
            ("GET", conv + "/items/(?P<item>[^/]+)", "conversations.items.retrieve", self.item),
            ("DELETE", conv + "/items/(?P<item>[^/]+)", "conversations.items.delete", self.drop),
            ("POST", r"/v1/embeddings", "embeddings.create", self.embeddings),
            ("GET", r"/v1/models/(?P<id>.+)", "models.retrieve", self.model),
        ]

    def get(self, conversation_id: str) -> StoredConversation:
        stored = self.stored.get(conversation_id)
        if stored is None:
            raise not_found("Conversation", conversation_id)
        return stored

    async def create(self, call: Call) -> None:
        raw = call.body.get("items") or []
        if len(raw) > MAX_CREATE_ITEMS:
            raise Refusal(
                400,
                f"Invalid 'items': array too long. Expected an array with maximum length "
                f"{MAX_CREATE_ITEMS}, but got an array with length {len(raw)} instead.",
                param="items",
                code="array_above_max_length",
            )
        conversation_id = new_id("conv")
        obj = {
            "id": conversation_id,
            "object": "conversation",
            "created_at": int(time.time()),
            "metadata": call.body.get("metadata") or {},
        }
        self.stored[conversation_id] = StoredConversation(obj, normalize_input(raw))
        await _json(call.send, 200, obj)

    async def retrieve(self, call: Call) -> None:
        await _json(call.send, 200, self.get(call.params["id"]).obj)

    async def update(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        if "metadata" not in call.body:
            raise Refusal(
                400,
                "Missing required parameter: 'metadata'.",
                param="metadata",
                code="missing_required_parameter",
            )
        stored.obj["metadata"] = call.body["metadata"] or {}
        await _json(call.send, 200, stored.obj)

    async def delete(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        del self.stored[call.params["id"]]
        answer = {"id": stored.obj["id"], "object": "conversation.deleted", "deleted": True}
        await _json(call.send, 200, answer)

    async def list_items(self, call: Call) -> None:
        await _json(call.send, 200, page(self.get(call.params["id"]).items, call.query))

    async def create_items(self, call: Call) -> None:
        stored = self.get(call.params["id"])
        items = normalize_input(call.body.get("items") or [])
        stored.items.extend(items)
        await _json(call.send, 200, page(items, {"order": "asc", "limit": str(len(items) + 1)}))

    def _item(self, call: Call) -> tuple[StoredConversation, dict[str, Any]]:
        stored = self.get(call.params["id"])
        for item in stored.items:
            if item["id"] == call.params["item"]:
                return stored, item
        raise not_found("Item", call.params["item"])

    async def item(self, call: Call) -> None:
        await _json(call.send, 200, self._item(call)[1])

    async def drop(self, call: Call) -> None:
        stored, item = self._item(call)
        stored.items.remove(item)
        await _json(call.send, 200, stored.obj)

    async def embeddings(self, call: Call) -> None:
        body = call.body
        model = str(body.get("model"))
        full = EMBEDDING_DIMENSIONS.get(model)
        if full is None:
            raise Refusal(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        inputs = _inputs(body.get("input"))
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if model == "text-embedding-ada-002":
                raise Refusal(400, "This model does not support specifying dimensions.")
            if not isinstance(dimensions, int) or not 1 <= dimensions <= full:
                raise Refusal(
                    400,
                    f"Invalid 'dimensions': expected an integer from 1 to {full}.",
                    param="dimensions",
                )
        bill = self.fake.biller.open(body)
        bill.prompt_tokens = sum(_tokens(item) for item in inputs)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = embedding(model, item, dimensions or full)
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": packed if as_base64 else vector,
                }
            )
        usage = {"prompt_tokens": bill.prompt_tokens, "total_tokens": bill.prompt_tokens}
        await _json(
            call.send, 200, {"object": "list", "data": data, "model": model, "usage": usage}
        )

    async def model(self, call: Call) -> None:
        model_id = call.params["id"]
        if model_id not in MODELS:
            raise Refusal(
                404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        created, owner = MODELS[model_id]
        answer = {"id": model_id, "object": "model", "created": created, "owned_by": owner}
        await _json(call.send, 200, answer)


def _inputs(value: Any) -> list[str | list[int]]:
    """`input` as a list of texts or token arrays, refused as OpenAI does when malformed."""
    tokens_only = isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or tokens_only:
        value = [value]
    ok = isinstance(value, list) and 0 < len(value) <= 2048
    for item in value if isinstance(value, list) else []:
        text = isinstance(item, str) and item != ""
        tokens = isinstance(item, list) and item and all(isinstance(t, int) for t in item)
        ok = ok and bool(text or tokens)
    if not ok:
        raise Refusal(
            400,
            "'$.input' is invalid. Please check the API reference: "
            "https://platform.openai.com/docs/api-reference.",
            param="input",
        )
    inputs: list[str | list[int]] = value
    return inputs


def _tokens(item: str | list[int]) -> int:
    return len(item.encode("utf-8", "surrogatepass")) if isinstance(item, str) else len(item)


def embedding(model: str, item: str | list[int], dimensions: int) -> list[float]:
    """The same input always gets the same vector; `dimensions` keeps its first part."""
    seed = hashlib.sha256(f"{model}\0{item!r}".encode()).digest()
    rng = random.Random(seed)
    full = [rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIMENSIONS[model])]
    short = full[:dimensions]
    norm = math.sqrt(sum(x * x for x in short)) or 1.0
    return [x / norm for x in short]
