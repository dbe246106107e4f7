"""Keep keys out of everything the gateway answers, logs, counts or stores.

Two lines of defence, in this order:

1. **By value.** The secrets the process holds (the operator's OpenAI key and
   the master key: `remember`) are found wherever they stand, in any of the
   forms text turns them into on the way: as they are, URL-encoded,
   JSON-escaped, hex, or inside base64 at any alignment.
2. **By shape.** Anything that looks like a key, known or not: OpenAI's
   `sk-…`, Groq's `gsk_…`, Azure-style keys of 32 hex digits, and our client
   keys `cak_…` (wherever they stand: client keys are not remembered, every
   `cak_` token is scrubbed). Base64 runs are decoded and checked for the same
   shapes, so a key base64-encoded into a header or a message is found too.

What the upstream sends is relayed as it sent it (`relayable`): looked through
for the remembered secrets as they are, one `in` each (the hot path), and
rewritten with every string scrubbed only when one is there.

The remembered secrets are process-wide, as the log handlers that use them
are: every app built in the process adds its own, and nothing is forgotten.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import quote, quote_plus

import orjson

REDACTED = "[redacted]"

# Key shapes. Request ids (ours, and OpenAI's `req_...`) are 32 hex digits too:
# `contains_secret`, the check for ids we pass on, does not count that shape;
# in free text (messages, log lines) it is scrubbed all the same.
_STRONG_SHAPES = (
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{8,}"  # OpenAI: sk-..., sk-proj-..., sk-svcacct-...
    r"|(?<![A-Za-z0-9])gsk_[A-Za-z0-9]{8,}"  # Groq
    r"|cak_[A-Za-z0-9_\-]{8,}"  # our client keys, wherever they stand
)
_AZURE_SHAPE = r"(?<![A-Za-z0-9])[0-9a-fA-F]{32}(?![A-Za-z0-9])"
_STRONG = re.compile(_STRONG_SHAPES)
# A client key's secret part without its `cak_` (store/keys.py: 43 URL-safe characters).
# Only ids we pass on are checked for it: in free text such runs are too common to scrub.
_KEY_BODY = re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])")
_ANY_SHAPE = re.compile(f"{_STRONG_SHAPES}|{_AZURE_SHAPE}")
# Long runs of base64 (either alphabet): where an encoded key would hide.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{24,4096}={0,2}")
_MIN_SECRET = 8  # shorter "secrets" would scrub ordinary words


class _Known:
    """The forms of every remembered secret, longest first (a form may contain another)."""

    def __init__(self) -> None:
        self.forms: list[str] = []
        self.secrets: set[str] = set()
        self.raw: tuple[bytes, ...] = ()  # each secret as it is, for `relayable`

    def add(self, secret: str) -> None:
        if len(secret) < _MIN_SECRET or secret in self.secrets:
            return
        self.secrets.add(secret)
        self.raw = (*self.raw, secret.encode("utf-8", "surrogatepass"))
        forms = set(self.forms) | _forms_of(secret)
        self.forms = sorted(forms, key=len, reverse=True)


_KNOWN = _Known()


def remember(secret: str | None) -> None:
    """Scrub this secret by value from now on (the operator key, the master key)."""
    if secret:
        _KNOWN.add(secret)


def _forms_of(secret: str) -> set[str]:
    raw = secret.encode("utf-8", "surrogatepass")
    forms = {
        secret,
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        raw.hex(),
    }
    # In base64 a secret's characters depend on where it starts (0, 1 or 2 bytes into a
    # group of three): keep, for each start, the characters its bytes alone decide.
    for pad in range(3):
        start = -(-pad * 8 // 6)
        end = (pad + len(raw)) * 8 // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(b"\0" * pad + raw).decode("ascii")[start:end])
    return {form for form in forms if len(form) >= _MIN_SECRET}


def _by_value(text: str) -> str:
    for form in _KNOWN.forms:
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def _shape_marker(match: re.Match[str]) -> str:
    return match.group(0)[:6] + "…" + REDACTED


def _hides_a_key(run: str, shapes: re.Pattern[str] = _ANY_SHAPE) -> bool:
    """Whether a base64 run decodes (at any alignment) to text holding a key."""
    for skip in range(4):
        body = run[skip:].rstrip("=")
        if len(body) % 4 == 1:
            body = body[:-1]  # a lone last character holds no whole byte
        if len(body) < 16:
            continue
        body += "=" * (-len(body) % 4)
        try:
            if "-" in body or "_" in body:
                decoded = base64.urlsafe_b64decode(body)
            else:
                decoded = base64.b64decode(body)
        except (binascii.Error, ValueError):
            continue
        plain = decoded.decode("latin-1")
        if shapes.search(plain) or any(secret in plain for secret in _KNOWN.secrets):
            return True
    return False


def _base64_keys(text: str) -> str:
    return _BASE64_RUN.sub(lambda m: REDACTED if _hides_a_key(m.group(0)) else m.group(0), text)


def redact(text: str) -> str:
    """`text` with every known secret and every key-like token replaced by a marker."""
    text = _by_value(text)
    text = _base64_keys(text)
    return _ANY_SHAPE.sub(_shape_marker, text)


def contains_secret(text: str) -> bool:
    """Whether `text` carries a known secret or an OpenAI/Groq/client key (for ids we pass on).

    A client key's 43 characters without their `cak_` count too. Unlike `redact`, 32 hex
    digits alone do not count: that is what request ids look like.
    """
    if any(form in text for form in _KNOWN.forms) or _STRONG.search(text):
        return True
    if _KEY_BODY.search(text):
        return True
    return any(_hides_a_key(m.group(0), _STRONG) for m in _BASE64_RUN.finditer(text))


def redact_json(value: Any) -> Any:
    """Parsed JSON with `redact` applied to every string in it, names included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(name)): redact_json(item) for name, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    return value


def relayable(raw: bytes, data: Any, *, scrub: bool = False) -> tuple[bytes, Any]:
    """An answer or event to relay as the upstream sent it (`raw`, and its parse), made safe.

    Returned as it is unless it holds a remembered secret as it is (an upstream that
    echoes the key into an id, a fingerprint, a message), or `scrub` (an error, whose
    message, param and code are scrubbed by shape too, as the upstream's error bodies
    are): then every string goes through `redact`, and the bytes are written anew.
    Strings are scrubbed one by one, so the answer stays valid JSON.
    """
    if not scrub:
        for secret in _KNOWN.raw:  # one `in` a secret: every stream event passes here
            if secret in raw:
                break
        else:
            return raw, data
    data = redact_json(data)
    return orjson.dumps(data), data
