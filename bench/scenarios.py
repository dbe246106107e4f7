"""The scenarios: each runs against the upstream directly, then through the gateway.

Sizes come in three profiles: `full` (the published figures), `quick` (a
minute or so) and `smoke` (seconds; CI runs it so the bench cannot rot).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import (
    HOST,
    BareRelay,
    Gateway,
    RedisServer,
    RSSSampler,
    Server,
    Upstream,
    cpu_seconds,
    load,
    request,
    rss_kib,
)

MODEL = "gpt-4o-mini"
V1 = "/v1/chat/completions"
V1_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
STREAM_BODY = {**V1_BODY, "stream": True, "stream_options": {"include_usage": True}}
CHAT_BODY = {"message": "Say hello."}
CHAT_STREAM = "/chat/stream"
EVENTS_AFTER_CHUNKS = 3  # the finish chunk, the usage chunk, [DONE]
# /chat/stream relays each text chunk as `data: {"content": ...}` and ends with one done event;
# its first event is the first text, as the first chunk of /v1 (and direct) is.
CHAT_EVENTS_AFTER_CHUNKS = 1
RESPONSES = "/v1/responses"
RESPONSES_BODY = {"model": MODEL, "input": "Say hello.", "stream": True}
# response.created, .in_progress, .output_item.added, .content_part.added before the text;
# .output_text.done, .content_part.done, .output_item.done, .completed after it.
RESPONSES_EVENTS_AROUND_DELTAS = 8
RESPONSES_FIRST = "event: response.output_text.delta"  # the first text, as chat's first chunk
MASTER_KEY = "bench-master-key-0123456789"
# The production shape: limits and a budget that are checked on every call, never reached.
KEY_SPEC = {"name": "bench", "rpm": 100_000_000, "tpm": 1_000_000_000, "budget_usd": 1_000_000}

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "seq": 3000,
        "seq_warmup": 300,
        "conc": 20000,
        "conc_duration": 15.0,
        "streams": [(500, 0.05), (500, 0.5), (5000, 0.5), (5000, 0.05)],
        "chunks": 20,
        "relay_chunks": 30_000,
        "open": (500, 20.0, 1.5),
        "workers2": True,
        "fresh": True,
        "keys_rounds": 5,
    },
    "quick": {
        "seq": 1500,
        "seq_warmup": 200,
        "conc": 5000,
        "conc_duration": 5.0,
        "streams": [(500, 0.05), (500, 0.5), (1000, 0.5)],
        "chunks": 20,
        "relay_chunks": 20_000,
        "open": (500, 5.0, 1.5),
        "workers2": True,
        "fresh": True,
        "keys_rounds": 3,
    },
    "smoke": {
        "seq": 30,
        "seq_warmup": 5,
        "conc": 80,
        "conc_duration": 5.0,
        "streams": [(20, 0.01)],
        "chunks": 5,
        "relay_chunks": 500,
        "open": (50, 1.0, 0.05),
        "workers2": False,
        "fresh": False,  # one gateway start only: it takes seconds
        "keys_rounds": 1,
    },
}


@dataclass
class Bench:
    """The running processes and what the scenarios found."""

    profile: dict[str, Any]
    workdir: Path
    gateway_cpus: str
    other_cpus: str
    upstream: Upstream
    gateway: Gateway | None = None
    gateway_env: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: Callable[[str], None] = print
    key: str | None = None  # the client key the load sends, when keys are on

    # --- processes ----------------------------------------------------------------

    def fresh_gateway(
        self,
        workers: int = 1,
        *,
        optional: bool = False,
        env: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Gateway:
        """A new gateway process, so memory figures start from a clean, warm baseline."""
        if optional and self.gateway is not None and not self.profile["fresh"]:
            return self.gateway
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        cpus = self.gateway_cpus if workers == 1 or not self.gateway_cpus else ""
        self.gateway = Gateway(
            cpus,
            self.workdir,
            self.upstream.port,
            workers=workers,
            extra_env={**self.gateway_env, **(env or {})},
        )
        self.upstream.configure(chunks=5, interval=0.0)
        if key is None and env:  # keys on: make the client key the load will use
            created = request(self.gateway.port, "POST", "/admin/keys", KEY_SPEC, key=MASTER_KEY)
            key = str(created["key"])
        for _ in range(20):
            request(self.gateway.port, "POST", V1, V1_BODY, key=key)
            request(self.gateway.port, "POST", "/chat", CHAT_BODY, key=key)
        self.key = key
        if key is None:
            self._warm_streams(self.gateway.port)
        return self.gateway

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def _load(self, port: int, spec: dict[str, Any]) -> dict[str, Any]:
        spec = {"host": HOST, "port": port, "path": V1, **spec}
        return load(self.other_cpus, spec)

    def _pair(
        self,
        name: str,
        spec: dict[str, Any],
        gateway_spec: dict[str, Any] | None = None,
        server: Server | None = None,
        direct: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The same load against the upstream, then through the gateway (or `server`).

        `direct`: the upstream's figures already measured for this load, to compare
        two routes with the same baseline.
        """
        server = server or self.gateway
        assert server is not None
        started = time.monotonic()
        if direct is None:
            direct = self._load(self.upstream.port, spec)
        baseline = rss_kib(server.pid)
        cpu_before = cpu_seconds(server.pid)
        with RSSSampler(server.pid) as rss:
            through = self._load(server.port, {**spec, **(gateway_spec or {})})
        # One process's CPU: with several workers, the master's only (a figure that means little).
        through["cpu_s"] = cpu_seconds(server.pid) - cpu_before
        through["rss_baseline_kib"] = baseline
        through["rss_peak_kib"] = max(rss.peak, baseline)
        result = {"direct": direct, "gateway": through}
        self.results[name] = result
        self.log(f"  {name}: {time.monotonic() - started:.1f}s")
        return result

    # --- scenarios ------------------------------------------------------------------

    def sequential(self) -> None:
        closed = self._seq1()
        self._pair("seq_v1", closed)
        self._pair("seq_chat", closed, {"path": "/chat", "body": CHAT_BODY})

    def _seq1(self) -> dict[str, Any]:
        """One client, non-streaming, each request sent when the last is answered."""
        p = self.profile
        self.upstream.configure(chunks=20, interval=0.0)
        closed = {"mode": "closed", "concurrency": 1, "requests": p["seq"], "duration": 120}
        closed.update(warmup=p["seq_warmup"], body=V1_BODY)
        return closed

    def _conc8(self) -> dict[str, Any]:
        """Eight clients, non-streaming, each sending its next request when the last is done."""
        p = self.profile
        spec = {"mode": "closed", "concurrency": 8, "requests": p["conc"], "body": V1_BODY}
        spec.update(warmup=p["conc"] // 20, duration=p["conc_duration"])
        self.upstream.configure(chunks=20, interval=0.0)
        return spec

    def _streams(self, count: int, interval: float) -> tuple[str, dict[str, Any]]:
        """`count` streams opened at once, `chunks` chunks each, `interval` apart."""
        chunks = self.profile["chunks"]
        self.upstream.configure(chunks=chunks, interval=interval)
        spec = {"mode": "streams", "streams": count, "body": STREAM_BODY}
        spec.update(expect_events=chunks + EVENTS_AFTER_CHUNKS, duration=chunks * interval + 60)
        return f"streams_{count}_{int(interval * 1000)}ms", spec

    def _responses_streams(self, count: int, interval: float) -> tuple[str, dict[str, Any]]:
        """As `_streams`, on `POST /v1/responses`: the same sizes, the same chunks."""
        name, spec = self._streams(count, interval)
        spec.update(path=RESPONSES, body=RESPONSES_BODY, first_marker=RESPONSES_FIRST)
        spec["expect_events"] = self.profile["chunks"] + RESPONSES_EVENTS_AROUND_DELTAS
        return f"responses_{name}", spec

    def _chat_streams(self, count: int, interval: float) -> tuple[str, dict[str, Any]]:
        """As `_streams`, on `POST /chat/stream` (the gateway side only: direct is the same)."""
        name, _ = self._streams(count, interval)
        spec = {"path": CHAT_STREAM, "body": CHAT_BODY}
        spec["expect_events"] = self.profile["chunks"] + CHAT_EVENTS_AFTER_CHUNKS
        return f"chat_{name}", spec

    def _warm_streams(self, port: int, *, chat: bool = True) -> None:
        self.upstream.configure(chunks=5, interval=0.0)
        self._load(port, {"mode": "streams", "streams": 20, "body": STREAM_BODY})
        if chat:
            warm = {"mode": "streams", "streams": 20, "path": CHAT_STREAM, "body": CHAT_BODY}
            self._load(port, warm)

    def concurrent(self) -> None:
        self._pair("conc8_v1", self._conc8())

    def keys_on(self) -> None:
        """The production shape: a client key with rpm, tpm and a budget, Redis on loopback.

        Measured against the keys-off rows of the same run (`seq_v1`, `conc8_v1`);
        run here first when they were not asked for.
        """
        if not RedisServer.available():
            self.log("  keys: skipped, redis-server is not installed")
            return
        if "seq_v1" not in self.results or "conc8_v1" not in self.results:
            self.fresh_gateway(optional=True)
            self.sequential()
            self.concurrent()
        redis = RedisServer(self.other_cpus, self.workdir)
        try:
            env = {"CHAT_API_MASTER_KEY": MASTER_KEY, "CHAT_API_REDIS_URL": redis.url}
            self.fresh_gateway(env=env)
            keyed = {"key": self.key}
            seq_direct = self._pair("keys_seq_v1", self._seq1(), keyed)["direct"]
            direct = self._pair("keys_conc8_v1", self._conc8(), keyed)["direct"]
            self._keys_rounds(env, seq_direct, direct)
        finally:
            self.stop()
            redis.stop()
            self.key = None
        self.fresh_gateway()  # keys off again for the scenarios after this one

    def _keys_rounds(
        self, env: dict[str, str], seq_direct: dict[str, Any], direct: dict[str, Any]
    ) -> None:
        """Keys off, then on, each on a fresh gateway, a few times: this machine's speed
        moves between runs, so one pair may mislead (measured: a keys-off p50 of 0.40 ms
        in one run, 0.80 in the next); the medians of rounds taken in turn much less
        (report.py: the `keys_rounds` rows, with the gateway's CPU per request).
        """
        for i in range(1, self.profile["keys_rounds"] + 1):
            for env_on, infix in ((None, "_off"), (env, "")):
                self.fresh_gateway(env=env_on)
                keyed = {"key": self.key} if env_on else {}
                self._pair(f"keys_r{i}{infix}_seq_v1", self._seq1(), keyed, direct=seq_direct)
                self._pair(f"keys_r{i}{infix}_conc8_v1", self._conc8(), keyed, direct=direct)

    def streams(self) -> None:
        """Each size on `/v1/chat/completions` and on `/chat/stream`, against one direct run.

        The direct run comes first; then each route gets a fresh gateway (in the full
        and quick profiles), so both start alike: neither inherits the other's upstream
        connections or memory.
        """
        for count, interval in self.profile["streams"]:
            name, spec = self._streams(count, interval)
            direct = self._load(self.upstream.port, spec)
            for route, route_spec in ((name, {}), self._chat_streams(count, interval)):
                self.fresh_gateway(optional=True)
                self._streams(count, interval)  # the warm-up changed the upstream's answers
                self._per_stream(self._pair(route, spec, route_spec, direct=direct))

    def responses_streams(self) -> None:
        """The `streams` sizes again on `POST /v1/responses`, for a side-by-side comparison."""
        for count, interval in self.profile["streams"]:
            gateway = self.fresh_gateway(optional=True)
            self.upstream.configure(chunks=5, interval=0.0)
            warm = {"mode": "streams", "streams": 20, "path": RESPONSES, "body": RESPONSES_BODY}
            self._load(gateway.port, warm)
            name, spec = self._responses_streams(count, interval)
            self._per_stream(self._pair(name, spec))

    def _per_stream(self, result: dict[str, Any]) -> None:
        gateway = result["gateway"]
        growth = gateway["rss_peak_kib"] - gateway["rss_baseline_kib"]
        gateway["rss_per_stream_kib"] = growth / max(1, gateway["peak_open"])

    def relay(self) -> None:
        chunks = self.profile["relay_chunks"]
        self.upstream.configure(chunks=chunks, interval=0.0)
        spec = {"mode": "streams", "streams": 1, "body": STREAM_BODY}
        spec.update(expect_events=chunks + EVENTS_AFTER_CHUNKS, duration=120)
        self._pair("relay", spec)

    def open_loop(self) -> None:
        rate, duration, latency = self.profile["open"]
        self.fresh_gateway(optional=True)
        self.upstream.configure(chunks=20, interval=0.0, latency=latency)
        spec = {"mode": "open", "rate": rate, "duration": duration, "timeout": 30.0}
        self._pair(f"open_{rate}rps", {**spec, "body": V1_BODY})
        self.upstream.configure(chunks=20, interval=0.0)

    def workers(self) -> None:
        if not self.profile["workers2"]:
            return
        self.fresh_gateway(workers=2)
        self._pair("workers2_conc8_v1", self._conc8())

    def floor(self) -> None:
        """The busiest loads through a bare relay on the same stack, for comparison."""
        self.stop()  # core 0 is the relay's alone
        relay = BareRelay(self.gateway_cpus, self.workdir, self.upstream.port)
        try:
            self._warm_streams(relay.port, chat=False)
            self._pair("floor_conc8_v1", self._conc8(), server=relay)
            name, spec = self._streams(*self.profile["streams"][0])
            self._pair(f"floor_{name}", spec, server=relay)
        finally:
            relay.stop()


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "sequential": Bench.sequential,
    "concurrent": Bench.concurrent,
    "keys": Bench.keys_on,
    "streams": Bench.streams,
    "responses": Bench.responses_streams,
    "relay": Bench.relay,
    "open": Bench.open_loop,
    "workers": Bench.workers,
    "floor": Bench.floor,
}
