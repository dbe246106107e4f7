"""What the offline demo model says, shared by its chat and Responses answers."""

from __future__ import annotations

import hashlib
from typing import Any

_OPENERS = (
    "Hello! I am the demo model of chat-api.",
    "Hi there, this is chat-api's built-in demo model.",
    "Thanks for trying chat-api. You are talking to its demo model.",
)

_BODY = (
    "I answer on this machine without calling OpenAI, so no key is needed and nothing is spent. "
    "You wrote: “{question}”. "
    "To talk to a real model, set **OPENAI_API_KEY_CYB_SEC** and start the service "
    "without `CHAT_API_DEMO`. Here is a small code block, to show formatting:\n\n"
    '```python\nprint("hello from chat-api")\n```\n'
)


def demo_answer(messages: list[Any]) -> str:
    """The demo's answer to a conversation: fixed text around the last user message."""
    question = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            question = content if isinstance(content, str) else "(a message with parts)"
            break
    question = " ".join(question.split())
    if len(question) > 200:
        question = question[:200] + "…"
    seed = hashlib.sha256(question.encode()).digest()[0]
    return f"{_OPENERS[seed % len(_OPENERS)]} {_BODY.format(question=question)}"


def words_of(text: str) -> list[str]:
    """Split keeping the spaces, so joining the pieces gives the text back."""
    pieces: list[str] = []
    start = 0
    for index, char in enumerate(text):
        if char == " " and index > start:
            pieces.append(text[start:index])
            start = index
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]
