"""Request and response shapes of the simple API, for validation and the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chat_api.blank import NOT_BLANK, strip_blanks
from chat_api.errors import BadRequest
from chat_api.redact import redact


class SimpleMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """Body of `POST /chat` and `POST /chat/stream`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "message": "What is the capital of France?",
                    "model": "gpt-4o-mini",
                    "system": "Answer in one sentence.",
                    "messages": [],
                    "temperature": 0.7,
                    "max_tokens": 200,
                }
            ]
        },
    )

    message: str = Field(
        description="The new user message. Required, not blank.",
        json_schema_extra={"pattern": NOT_BLANK},  # documents the not-blank check below
    )
    model: str | None = Field(default=None, description="A model from `GET /models`.")
    messages: list[SimpleMessage] = Field(
        default_factory=list, description="The conversation so far, oldest first."
    )
    system: str | None = Field(default=None, description="Instructions placed first.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _whole_float_is_an_integer(cls, value: Any) -> Any:
        # JSON does not tell 1 from 1.0, and some JSON writers send 1.0 for 1.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    """Answer of `POST /chat`."""

    response: str
    model: str
    conversation: list[SimpleMessage]
    usage: Usage


class SimpleError(BaseModel):
    """Every simple-API error: one sentence a person can act on."""

    error: str


def simple_errors(**texts: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for simple-API errors: `simple_errors(e404="No such key.")`."""
    return {
        int(status[1:]): {"model": SimpleError, "description": text}
        for status, text in texts.items()
    }


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"]
    service: str
    provider: str
    integration: str


class ModelsResponse(BaseModel):
    models: list[str]
    default: str


_TYPE_WORDS = {
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "bool_type": "must be true or false",
}


def parse_chat_request(data: Any) -> ChatRequest:
    """Validate a simple-API body; any problem is one plain 400 sentence."""
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None
    if not strip_blanks(request.message):
        raise BadRequest("'message' must not be blank.", param="message")
    return request


def describe(exc: ValidationError) -> str:
    """The first validation problem, said plainly (a field named like a key is not echoed)."""
    error = exc.errors()[0]
    where = redact(_bracket_indexes(error["loc"]))
    kind = error["type"]
    if kind == "missing":
        return f"'{where}' is required."
    if kind == "extra_forbidden":
        return f"Unknown field '{where}'."
    if kind == "literal_error" and where.endswith("role"):
        return f"'{where}' must be one of: system, user, assistant."
    if kind in _TYPE_WORDS:
        return f"'{where}' {_TYPE_WORDS[kind]}."
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"'{where}' is out of range: {error['msg'].lower()}."
    return f"'{where}' is not valid: {error['msg']}."


def _bracket_indexes(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
