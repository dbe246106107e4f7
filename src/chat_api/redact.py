"""Scrub anything that looks like a key out of text we pass on or log."""

from __future__ import annotations

import re

# OpenAI keys (sk-..., sk-proj-...) and our own client keys (cak_...).
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|cak_[A-Za-z0-9_\-]{8,})")


def redact(text: str) -> str:
    """Replace every key-like token with a short, harmless marker."""
    return _KEY_PATTERN.sub(lambda m: m.group(0)[:6] + "…[redacted]", text)
