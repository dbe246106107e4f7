"""Token counts the gateway works out itself, before or without the upstream's.

Two kinds, never mixed up:

- **Bounds** (`prompt_bound`), for money: the most the upstream can bill for
  reading a request. OpenAI's tokenizer works on bytes, so a token never
  covers less than one UTF-8 byte of text: counting every byte of every
  string the model reads (messages, tools, schemas, instructions, the keys
  and punctuation of the JSON they are written in) can only err on the
  operator's side, whatever a hostile client sends. Images count at their
  worst by OpenAI's rules, files and audio by their size, a file sent by id
  (size unknown here) as the model's whole context. A bound never passes
  the model's context window: OpenAI refuses a longer prompt unbilled.
- **Estimates** (`estimate_prompt_tokens`, `tokens_for_chars`), for what a
  person reads (the demo's usage, a simple-API answer without usage): about
  four characters a token, as for English.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
# One image at its worst: OpenAI's tile rule (85 + 170 per 512 px tile, at most
# 8 tiles once scaled into 2048 x 768) gives 1,445; patch-based models (gpt-4.1-mini,
# o4-mini) cap at 1,536 patches. The larger, plus room for the detail marker.
IMAGE_TOKENS = 1_600
# A PDF is read as its text and an image of every page.
_PDF_PAGE = b"/Type /Page"
_PDF_PAGE_TIGHT = b"/Type/Page"

# Request fields the model does not read: settings of the call, not its prompt.
NOT_READ = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "user",
        "store",
        "metadata",
        "background",
        "service_tier",
        "parallel_tool_calls",
        "previous_response_id",
        "conversation",
        "include",
        "truncation",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "prompt_cache_key",
        "safety_identifier",
        "encoding_format",
        "dimensions",
        "modalities",
        "reasoning_effort",
    }
)


class _Unbounded(Exception):
    """The request refers to something whose size cannot be known here."""


def prompt_bound(body: dict[str, Any], context_window: int) -> int:
    """The most the upstream can bill for reading `body` (see the module docstring)."""
    messages = body.get("messages")
    total = TOKENS_PER_REPLY
    if isinstance(messages, list):
        total += TOKENS_PER_MESSAGE * len(messages)
    try:
        for name, value in body.items():
            if name not in NOT_READ:
                total += len(name) + _bound(value)
                if total >= context_window:
                    return context_window
    except _Unbounded:
        return context_window
    return min(total, context_window)


def _bound(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image"):
            return IMAGE_TOKENS
        if kind in ("file", "input_file"):
            return _file_bound(value.get("file", value))
        if kind == "input_audio":
            audio = value.get("input_audio")
            return len(str(audio.get("data", ""))) if isinstance(audio, dict) else 0
        # Each key and a token of punctuation per entry: the JSON the model is shown.
        return sum(len(key) + 1 + _bound(item) for key, item in value.items())
    if isinstance(value, list):
        return sum(1 + _bound(item) for item in value)
    if value is None or isinstance(value, bool):
        return 1
    return len(str(value))


def _file_bound(file: Any) -> int:
    """A file's text (at most a token per byte) and, for a PDF, an image of each page."""
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        raise _Unbounded  # sent by id or by URL: only the upstream knows its size
    encoded = data.partition("base64,")[2] or data
    try:
        raw = base64.b64decode(encoded, validate=False)
    except (binascii.Error, ValueError):
        return len(data)
    pages = raw.count(_PDF_PAGE) + raw.count(_PDF_PAGE_TIGHT)
    pages -= raw.count(_PDF_PAGE + b"s") + raw.count(_PDF_PAGE_TIGHT + b"s")  # /Type /Pages
    return len(raw) + max(0, pages) * IMAGE_TOKENS


def tokens_for_chars(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_text_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def estimate_prompt_tokens(messages: Any) -> int:
    """About how many tokens a person would count in `messages` (not for money)."""
    if not isinstance(messages, list):
        return TOKENS_PER_REPLY
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += estimate_text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_text_tokens(part["text"])
                else:
                    total += 85  # an image or other part: OpenAI's low-detail cost
        calls = message.get("tool_calls")
        if calls:
            total += estimate_text_tokens(str(calls))
    return total
