"""Token estimates, for when the upstream's exact count is not (yet) known.

Used to reserve budget before a call and to bill an aborted stream. English
text runs about four characters a token; the per-message overhead follows
OpenAI's published counting guide. Estimates are always marked as such in
the ledger.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def tokens_for_chars(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_text_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def estimate_prompt_tokens(messages: Any) -> int:
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
