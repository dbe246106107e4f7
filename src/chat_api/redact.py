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
for the remembered secrets as they are (the hot path: one short probe each),
and rewritten with every string scrubbed only when one is there. Otherwise
only its error parts (an error event's message, code and param, a failed
response's `error`) are scrubbed, by value and by shape, as error bodies are:
model output that happens to look like a key (32 hex digits) is relayed as is.

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
# How much of each secret `relayable` looks for first. `bytes.find` on a long needle pays
# for the whole needle before it scans (a 164-character key: ~2x the cost of 16 bytes):
# the secret can be there only if its probe is, so the whole secret is looked for only then.
_PROBE = 16
# The fields of a Responses `error` event that carry the upstream's error, at its top.
_ERROR_EVENT_FIELDS = ("message", "code", "param")


class _Known:
    """The forms of every remembered secret, longest first (a form may contain another)."""

    def __init__(self) -> None:
        self.forms: list[str] = []
        self.secrets: set[str] = set()
        # Each secret as it is, with its probe (its last bytes: the random part of a key,
        # where its start, `sk-proj-`, is shared by every key), for `relayable`.
        self.probes: tuple[tuple[bytes, bytes], ...] = ()

    def add(self, secret: str) -> None:
        if len(secret) < _MIN_SECRET or secret in self.secrets:
            return
        self.secrets.add(secret)
        raw = secret.encode("utf-8", "surrogatepass")
        self.probes = (*self.probes, (raw[-_PROBE:], raw))
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


def _scrubbed_errors(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its error parts scrubbed (`data` itself when they were clean).

    A Responses `error` event has its message, code and param at its top; a
    `response.failed` event has its response's `error`; a whole answer (or any event)
    its own `error`. Nothing else is touched: it is the model's output, relayed unchanged.
    """
    kind = data.get("type")
    scrubbed = dict(data)
    if data.get("error") is not None:
        scrubbed["error"] = redact_json(data["error"])
    if kind == "error":
        for name in _ERROR_EVENT_FIELDS:
            if name in data:
                scrubbed[name] = redact_json(data[name])
    elif kind == "response.failed":
        response = data.get("response")
        if isinstance(response, dict) and response.get("error") is not None:
            scrubbed["response"] = {**response, "error": redact_json(response["error"])}
    return data if scrubbed == data else scrubbed


def relayable(raw: bytes, data: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """An answer or event to relay as the upstream sent it (`raw`, and its parse), made safe.

    Returned as it is unless it holds a remembered secret as it is (an upstream that
    echoes the key into an id, a fingerprint, a message: then every string goes through
    `redact`), or its error parts (`_scrubbed_errors`) hold a key, known or by its
    shape, as the upstream's error bodies are scrubbed. Either way the bytes are written
    anew from the scrubbed strings, so the answer stays valid JSON.

    Every stream event passes here, so the clean case is kept to a few C calls: one
    `find` of a 16-byte probe per secret (not `in`, which first tries its operand as a
    byte value), the whole secret looked for only where its probe is.
    """
    find = raw.find
    for probe, secret in _KNOWN.probes:
        if find(probe) >= 0 and secret in raw:
            data = redact_json(data)
            return orjson.dumps(data), data
    kind = data.get("type")
    # `!=`, not `in` a set: `type` may be any JSON, a list too.
    if data.get("error") is None and kind != "error" and kind != "response.failed":
        return raw, data  # a chunk, an event or an answer that is no error
    scrubbed = _scrubbed_errors(data)
    if scrubbed is data:
        return raw, data
    return orjson.dumps(scrubbed), scrubbed
