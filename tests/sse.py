"""Read server-sent events the way a browser's EventSource would."""

from __future__ import annotations

import json
from typing import Any

import httpx


def events(response: httpx.Response) -> list[str]:
    """The `data` of each event, in order (comments dropped)."""
    found: list[str] = []
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                found.append("\n".join(data))
    return found


def json_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(data) for data in events(response) if data != "[DONE]"]
