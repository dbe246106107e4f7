"""The gateway's one middleware, written as plain ASGI (no per-request task).

For every HTTP request it: finds the real client address (believing
`X-Forwarded-For` only from `CHAT_API_TRUSTED_PROXIES`); picks the request id
(the client's `X-Request-ID` when it is sane and carries no secret, else a
new one) and returns it; caps the body size (413), whether or not a
Content-Length was sent, and gives up on a body that has not arrived within
`body_timeout` seconds (408); adds security headers, a Content-Security-Policy
on every HTML answer and `openai-processing-ms` on every `/v1` answer; when the
answer is complete, hands the status and duration to `observe` (access_log.py: the metrics
and the log line). A request the server stops before its answer started (its
shutdown grace ran out) gets a 503 that asks to send it again, not uvicorn's
plain-text 500 and a traceback. In front of it, `CrossOrigin` answers CORS for
requests from browsers and marks those from websites that may not call (403 here).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chat_api.errors import (
    ChatAPIError,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    ServerStopping,
)
from chat_api.redact import contains_secret

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# What CORS adds to an answer for a request without an Origin header: caches
# must not hand it to a browser page, whose request does carry one.
VARY_ORIGIN = (b"vary", b"Origin")
SECURITY_HEADERS_AND_VARY = (*SECURITY_HEADERS, VARY_ORIGIN)
# Every HTML answer gets this unless it brings its own: scripts, styles and
# connections from this server only, no plugins, no framing.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
_CSP_HEADER = (b"content-security-policy", PAGE_CSP.encode("latin-1"))

# How CrossOrigin marks a request from a browser page, for the gateway layer.
CROSS_ORIGIN = "chat_api.cross_origin"
LISTED, SAME, REFUSED = "listed", "same", "refused"

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(entries: Sequence[str]) -> Networks:
    """`CHAT_API_TRUSTED_PROXIES` as networks (a bare address is a network of one)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: str, trusted: Networks) -> bool:
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def client_address(peer: str, forwarded: Sequence[bytes], trusted: Networks) -> str:
    """Who is really calling: the peer, or (from a trusted proxy) the nearest untrusted hop.

    Each proxy appends the address it saw to `X-Forwarded-For`, so the list is
    read from the right, skipping trusted proxies: what a client writes on the
    left itself is never reached while a trusted proxy stands after it.
    """
    if not trusted or not forwarded or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if hop and not _trusted(hop, trusted):
            address = _address(hop)  # not an address ("unknown", junk): no one to name
            return str(address) if address is not None else "unknown"
    return peer


class CrossOrigin(CORSMiddleware):
    """Starlette's CORS, for the requests that carry an `Origin` header.

    Only browsers send one, and only then is there anything to allow or to
    refuse. Every other call (SDKs, curl, servers: nearly all the traffic)
    goes straight on, without CORS's header parsing and send wrapper; the
    gateway layer gives its answer the one header CORS would have added,
    `Vary: Origin`.

    A request from a page of the gateway's own origin (the chat page: browsers
    send `Origin` on its POSTs) goes straight on too. One from a website not in
    `CHAT_API_CORS_ORIGINS` is refused before anything runs: a browser would
    hide the answer from that page, but a simple POST (no preflight) would
    still have been answered, and paid for.

    `own_hosts` (keys off): the names the gateway's own page may be opened on,
    besides loopback names and IP addresses (`own_host_names`). A website whose
    name its DNS turns into 127.0.0.1 (DNS rebinding) is, to the browser, the
    origin it asks: `Origin`, `Host` and `Sec-Fetch-Site` all say same-origin.
    Only its name gives it away, so a browser's request (one with `Origin` or
    `Sec-Fetch-Site`, even a GET) to a name the gateway is not known by is
    refused. With keys on (`None`) a page cannot call without a key anyway.
    """

    def __init__(
        self, app: ASGIApp, *, own_hosts: frozenset[str] | None = None, **cors: Any
    ) -> None:
        super().__init__(app, **cors)
        self.own_hosts = own_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = sec_fetch_site = host = None
        for name, value in scope.get("headers", ()):  # lifespan has none
            if name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                sec_fetch_site = value
            elif name == b"host":
                host = value
        if origin is None:
            if sec_fetch_site is not None and not self._own(host):
                scope[CROSS_ORIGIN] = REFUSED  # a browser, on a name not the gateway's
            await self.app(scope, receive, send)
            return
        preflight = scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        )
        if preflight or self.is_allowed_origin(origin.decode("latin-1")):
            scope[CROSS_ORIGIN] = LISTED
            await super().__call__(scope, receive, send)
            return
        same = sec_fetch_site == b"same-origin" or _same_origin(origin, host)
        # "null" names no host: the request's own Host must then be the gateway's.
        same = same and self._own(host) and (origin == b"null" or self._own(origin))
        scope[CROSS_ORIGIN] = SAME if same else REFUSED
        await self.app(scope, receive, send)

    def _own(self, url: bytes | None) -> bool:
        """Whether `url` (an origin, or a `Host` value) names the gateway itself."""
        if self.own_hosts is None:
            return True
        if url is None:
            return False
        text = url.decode("latin-1")
        try:
            name = urlsplit(text if "://" in text else "//" + text).hostname
        except ValueError:  # "[::1" and the like
            return False
        return name is not None and _known_host(name, self.own_hosts)


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """Whether `Origin` names the host the request was sent to (default ports left out)."""
    if host is None:
        return False
    scheme, _, netloc = origin.lower().partition(b"://")
    default = {b"http": b":80", b"https": b":443"}.get(scheme)
    host = host.lower()
    if default is not None:
        netloc, host = netloc.removesuffix(default), host.removesuffix(default)
    return bool(netloc) and netloc == host


def own_host_names(origins: Sequence[str], bind_host: str) -> frozenset[str]:
    """The names, besides loopback and IP addresses, the gateway's page may be opened on.

    The one it listens on (`CHAT_API_HOST`, when a name), those of the origins
    in `CHAT_API_CORS_ORIGINS`, and this machine's own name (as `mybox` and
    `mybox.local`, how a LAN reaches it): names the operator or the machine
    gave, which no website's DNS controls.
    """
    names = {urlsplit(origin).hostname for origin in origins if origin != "*"}
    names.add(bind_host.strip("[]").lower())
    machine = socket.gethostname().lower()
    names.update((machine, machine.partition(".")[0] + ".local"))
    return frozenset(name for name in names if name)


def _known_host(name: str, own: frozenset[str]) -> bool:
    """Whether `name` is a loopback name, an IP address, or one of `own`.

    An address has no DNS to rebind: the browser reached this very server at
    it (bound to 0.0.0.0, behind Docker or NAT, it may be any of several).
    """
    if name == "localhost" or name.endswith(".localhost") or name in own:
        return True
    try:
        ipaddress.ip_address(name.partition("%")[0])  # fe80::1%eth0
    except ValueError:
        return False
    return True


def cors_summary(origins: Sequence[str], keys_enabled: bool) -> str:
    """The one line at startup that says which websites may call from a browser."""
    if not origins:
        return (
            "CORS: only the gateway's own page may call it from a browser; "
            "list other sites in CHAT_API_CORS_ORIGINS to allow them."
        )
    which = "any website" if "*" in origins else ", ".join(origins)
    if keys_enabled:
        return f"CORS: browsers may call from {which}; every call still needs a key."
    return f"CORS: browsers may call from {which}, and keys are off: they spend your OpenAI key."


def is_openai_dialect(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


Observer = Callable[[Scope, int, float], None]


def _refused_origin() -> Forbidden:
    return Forbidden(
        "This server does not take requests from other websites. The operator can allow "
        "a site by adding its origin to CHAT_API_CORS_ORIGINS.",
        code="cross_origin_not_allowed",
    )


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout: float,
        observe: Observer,
        trusted_proxies: Networks = (),
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout
        self.observe = observe
        self.trusted = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = ""
        declared = -1
        forwarded: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                # A key sent as a request id would be logged, stored and sent upstream:
                # such an id is replaced by a fresh one.
                if _SANE_ID.match(candidate) and not contains_secret(candidate):
                    request_id = candidate
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif name == b"x-forwarded-for":
                forwarded.append(value)
        if forwarded and self.trusted and scope.get("client"):
            peer, port = scope["client"]
            scope["client"] = (client_address(peer, forwarded, self.trusted), port)
        if not request_id:
            request_id = os.urandom(16).hex()  # as random as a uuid4, a third of the cost
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        cross_origin = scope.get(CROSS_ORIGIN)
        # Starlette's CORS adds Vary itself to what it lets through.
        extra_headers = SECURITY_HEADERS if cross_origin == LISTED else SECURITY_HEADERS_AND_VARY
        exchange = _Exchange(
            receive,
            send,
            [(b"x-request-id", request_id.encode("latin-1")), *extra_headers],
            max_body=self.max_body,
            body_timeout=self.body_timeout,
            started=started if is_openai_dialect(scope["path"]) else None,
        )
        try:
            if cross_origin == REFUSED:
                await _reject(scope, exchange.send, _refused_origin())
            elif declared > self.max_body:
                await _reject(scope, exchange.send, PayloadTooLarge(self.max_body))
            else:
                await self.app(scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            # Disconnect watchers end their own requests (sse.py, http_responses.py): this is
            # the server stopping. Nothing sent yet: say so, and end as answered.
            task = asyncio.current_task()
            if exchange.started or task is None or task.uncancel() > 0:
                raise
            await _reject(scope, exchange.send, ServerStopping())
        finally:
            self.observe(scope, exchange.status, time.perf_counter() - started)


class _Exchange:
    """One request's side of `GatewayMiddleware`: the send and receive it passes on.

    An object with slots rather than two closures over ten variables:
    thousands of open streams hold one each.
    """

    __slots__ = (
        "_deadline",
        "_headers",
        "_max_body",
        "_receive",
        "_send",
        "_started",
        "_timeout",
        "body_done",
        "received",
        "started",
        "status",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        *,
        max_body: int,
        body_timeout: float,
        started: float | None,
    ) -> None:
        self._receive, self._send, self._headers = receive, send, headers
        self._started = started  # set on /v1: the answer says how long it took, as OpenAI's do
        self._max_body, self._timeout = max_body, body_timeout
        self._deadline = asyncio.get_running_loop().time() + body_timeout
        self.status = 500  # until an answer starts
        self.started = False
        self.received = 0
        self.body_done = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            headers = [*message.get("headers", ()), *self._headers]
            if self._started is not None:
                spent = round((time.perf_counter() - self._started) * 1000)
                headers.append((b"openai-processing-ms", str(spent).encode()))
            if _is_html_without_csp(headers):
                headers.append(_CSP_HEADER)
            message["headers"] = headers
        await self._send(message)

    async def receive(self) -> Message:
        """The body, capped in size and time; after it, only the disconnect is left."""
        if self.body_done:
            return await self._receive()
        try:
            async with asyncio.timeout_at(self._deadline):
                message = await self._receive()
        except TimeoutError:
            raise RequestTimeout(self._timeout) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self._max_body:
                raise PayloadTooLarge(self._max_body)
        return message


def _is_html_without_csp(headers: list[tuple[bytes, bytes]]) -> bool:
    html = False
    for name, value in headers:
        if name == b"content-security-policy":
            return False
        if name == b"content-type":
            html = value.startswith(b"text/html")
    return html


async def _reject(scope: Scope, send: Send, error: ChatAPIError) -> None:
    """Answer `error` and close the connection, in the request's dialect."""
    openai_dialect = is_openai_dialect(scope["path"])
    body = error.body(openai_dialect)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()
    ]
    await send(
        {
            "type": "http.response.start",
            "status": error.status_for(openai_dialect),
            "headers": headers,
        }
    )
    await send({"type": "http.response.body", "body": body})
