"""Turn raw load results into the table, the JSON summary and the latency chart."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _f(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _signed(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:+.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "MISSED")


Row = dict[str, Any]


def _row(scenario: str, measure: str, direct: str, gateway: str, delta: str, target: str,
         ok: bool | None, value: float | None = None) -> Row:  # fmt: skip
    return {
        "scenario": scenario,
        "measure": measure,
        "direct": direct,
        "gateway": gateway,
        "delta": delta,
        "target": target,
        "verdict": _verdict(ok),
        "met": ok,
        "value": value,
    }


def _latency_rows(
    name: str, result: dict[str, Any], targets: tuple[float, float] | None
) -> list[Row]:
    d, g = result["direct"]["latency_ms"], result["gateway"]["latency_ms"]
    rows = []
    for q, limit in zip((50, 99), targets or (None, None), strict=True):
        added = pct(g, q) - pct(d, q)
        ok = None if limit is None else added <= limit
        target = "" if limit is None else f"≤ +{limit:g} ms"
        rows.append(
            _row(
                name,
                f"latency p{q} (ms)",
                _f(pct(d, q)),
                _f(pct(g, q)),
                _signed(added),
                target,
                ok,
                added,
            )
        )
    return rows


def _completed(result: dict[str, Any], side: str) -> str:
    r = result[side]
    return f"{r['completed']}/{r['requested']}"


def _first_chunk_p99(name: str, result: dict[str, Any], *, with_target: bool) -> Row:
    d, g = result["direct"]["first_ms"], result["gateway"]["first_ms"]
    ratio = pct(g, 99) / pct(d, 99) if d and g else math.nan
    return _row(
        name,
        "first event p99 (ms)" if name.startswith("responses_") else "first chunk p99 (ms)",
        _f(pct(d, 99)),
        _f(pct(g, 99)),
        f"{ratio:.2f}×",
        "≤ 1.5× direct" if with_target else "",
        (ratio <= 1.5) if with_target else None,
        ratio,
    )


def summarize(results: dict[str, dict[str, Any]]) -> list[Row]:
    """One row per measure, with the issue's target and whether it held."""
    rows: list[Row] = []
    for name in ("seq_v1", "seq_chat"):
        if name in results:
            rows += _latency_rows(name, results[name], (1.0, 3.0))
    if "conc8_v1" in results:
        r = results["conc8_v1"]
        d, g = r["direct"]["rps"], r["gateway"]["rps"]
        rows.append(
            _row(
                "conc8_v1",
                "requests/s, 8 clients",
                _f(d),
                _f(g),
                f"{g / d:.0%} of direct",
                "≥ 1,500",
                g >= 1500,
                g,
            )
        )
        rows += _latency_rows("conc8_v1", r, None)
    rows += _keys_rows(results)
    rows += _stream_rows(results)
    if "relay" in results:
        r = results["relay"]
        d, g = r["direct"]["events_per_s"] or math.nan, r["gateway"]["events_per_s"] or math.nan
        rows.append(
            _row(
                "relay",
                "chunks/s, one fast stream",
                _f(d),
                _f(g),
                f"{g / d:.0%} of direct",
                "",
                None,
                g,
            )
        )
    for name, r in results.items():
        if not name.startswith("open_"):
            continue
        d, g = r["direct"], r["gateway"]
        rate = g["completed"] / g["requested"] if g["requested"] else 0.0
        rows.append(
            _row(
                name,
                "success",
                f"{d['completed'] / d['requested']:.1%}",
                f"{rate:.1%}",
                f"{g['failed']} failed",
                "100 %",
                g["failed"] == 0,
                rate,
            )
        )
        rows += _latency_rows(name, r, None)
        rows[-1].update(target="≤ +50 ms", verdict=_verdict(rows[-1]["value"] <= 50))
        rows[-1]["met"] = rows[-1]["value"] <= 50
    if "floor_conc8_v1" in results:
        r = results["floor_conc8_v1"]
        d, g = r["direct"]["rps"], r["gateway"]["rps"]
        rows.append(
            _row("floor_conc8_v1", "requests/s, 8 clients", _f(d), _f(g), "bare relay", "", None, g)
        )
        rows += _latency_rows("floor_conc8_v1", r, None)
    for name, r in results.items():
        if not name.startswith("floor_streams_"):
            continue
        rows.append(
            _row(name, "completed", _completed(r, "direct"), _completed(r, "gateway"), "", "", None)
        )
        rows.append(_first_chunk_p99(name, r, with_target=False))
        rows.append(_cpu_row(name, r, "bare relay"))
        floor_p99 = pct(r["gateway"]["first_ms"], 99)
        for route in (prefix + name.removeprefix("floor_streams_") for prefix in STREAM_ROUTES):
            if route in results:
                p99 = pct(results[route]["gateway"]["first_ms"], 99)
                rows.append(
                    _row(
                        route,
                        "first chunk p99 (ms): bare relay → gateway",
                        _f(floor_p99),
                        _f(p99),
                        f"{p99 / floor_p99:.2f}×",
                        "",
                        None,
                        p99 / floor_p99,
                    )
                )
    if "workers2_conc8_v1" in results and "conc8_v1" in results:
        one = results["conc8_v1"]["gateway"]["rps"]
        two = results["workers2_conc8_v1"]["gateway"]["rps"]
        rows.append(
            _row(
                "workers2_conc8_v1",
                "requests/s: 1 worker → 2 workers",
                _f(one),
                _f(two),
                f"{two / one:.2f}×",
                "scales (≥ 1.5×)",
                two / one >= 1.5,
                two / one,
            )
        )
    return rows


def _cpu_row(name: str, result: dict[str, Any], server: str = "gateway") -> Row:
    """The server's CPU time per stream: steadier than any latency on a shared machine.

    It is also what the first chunk waits for: with every stream opening at
    once, the last one waits for nearly all of it to be spent.
    """
    side = result["gateway"]
    cpu = float(side.get("cpu_s", math.nan)) * 1000 / max(1, side["requested"])
    return _row(name, f"{server} CPU per stream (ms)", "", _f(cpu, 3), "", "", None, cpu)


# The routes streams are measured on, in the order their rows are printed side by side.
STREAM_ROUTES = {
    "streams_": "/v1/chat/completions",
    "chat_streams_": "/chat/stream",
    "responses_streams_": "/v1/responses",
}


def _stream_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """Per size (`500_50ms`, ...), each measure for every route measured, one under another."""
    sizes: dict[str, dict[str, dict[str, Any]]] = {}
    for prefix in STREAM_ROUTES:
        for name, r in results.items():
            if name.startswith(prefix):
                sizes.setdefault(name.removeprefix(prefix), {})[name] = r
    rows: list[Row] = []
    for size, routes in sizes.items():
        count_text, interval = size.split("_")
        count = int(count_text)
        must_complete = count <= 500 or interval == "500ms"
        rss_target = count >= 5000 and interval == "500ms"
        for name, r in routes.items():
            all_done = r["gateway"]["completed"] == count
            rows.append(
                _row(
                    name,
                    "completed",
                    _completed(r, "direct"),
                    _completed(r, "gateway"),
                    "",
                    "all" if must_complete else "",
                    all_done if must_complete else None,
                )
            )
        for name, r in routes.items():
            d, g = r["direct"]["first_ms"], r["gateway"]["first_ms"]
            first = "first event" if name.startswith("responses_") else "first chunk"
            rows.append(
                _row(
                    name,
                    f"{first} p50 (ms)",
                    _f(pct(d, 50)),
                    _f(pct(g, 50)),
                    _signed(pct(g, 50) - pct(d, 50)),
                    "",
                    None,
                )
            )
        rows += [_first_chunk_p99(name, r, with_target=count <= 500) for name, r in routes.items()]
        rows += [_cpu_row(name, r) for name, r in routes.items()]
        for name, r in routes.items():
            gw = r["gateway"]
            per_stream = gw.get("rss_per_stream_kib", math.nan)
            rows.append(
                _row(
                    name,
                    "gateway RSS peak (MiB) / per open stream (KiB)",
                    "",
                    f"{gw['rss_peak_kib'] / 1024:.0f}",
                    f"{per_stream:.1f} KiB/stream",
                    "≤ 30 KB/stream" if rss_target else "",
                    (per_stream * 1.024 <= 30) if rss_target else None,
                    per_stream,
                )
            )
    return rows


def _keys_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """Keys on (a key with rpm, tpm and a budget; Redis) against keys off, in the same run."""
    rows: list[Row] = []
    if "keys_seq_v1" in results and "seq_v1" in results:
        on, off = results["keys_seq_v1"], results["seq_v1"]
        for q in (50, 99):
            added_on = pct(on["gateway"]["latency_ms"], q) - pct(on["direct"]["latency_ms"], q)
            added_off = pct(off["gateway"]["latency_ms"], q) - pct(off["direct"]["latency_ms"], q)
            extra = added_on - added_off
            target = q == 50
            rows.append(
                _row(
                    "keys_seq_v1",
                    f"added p{q} (ms): keys off → keys on",
                    _signed(added_off),
                    _signed(added_on),
                    _signed(extra),
                    "≤ +0.3 ms" if target else "",
                    (extra <= 0.3) if target else None,
                    extra,
                )
            )
    if "keys_conc8_v1" in results:
        on_rps = results["keys_conc8_v1"]["gateway"]["rps"]
        off_rps = results.get("conc8_v1", {}).get("gateway", {}).get("rps", math.nan)
        rows.append(
            _row(
                "keys_conc8_v1",
                "requests/s, 8 clients: keys off → keys on",
                _f(off_rps),
                _f(on_rps),
                f"{on_rps / off_rps:.0%} of keys off",
                "≥ 2,000",
                on_rps >= 2000,
                on_rps,
            )
        )
        rows += _latency_rows("keys_conc8_v1", results["keys_conc8_v1"], None)
    rows += _keys_round_rows(results)
    return rows


def _keys_round_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """The medians of the interleaved keys-off / keys-on rounds (scenarios.py)."""
    off = [results[n]["gateway"] for n in results if re.fullmatch(r"keys_r\d+_off_conc8_v1", n)]
    on = [results[n]["gateway"] for n in results if re.fullmatch(r"keys_r\d+_conc8_v1", n)]
    if not off or not on:
        return []

    def cpu_us(runs: list[dict[str, Any]]) -> float:
        return statistics.median(r["cpu_s"] / max(1, r["completed"]) * 1e6 for r in runs)

    def rps(runs: list[dict[str, Any]]) -> float:
        return statistics.median(r["rps"] for r in runs)

    rounds = f"median of {min(len(off), len(on))} rounds taken in turn"
    off_cpu, on_cpu, off_rps, on_rps = cpu_us(off), cpu_us(on), rps(off), rps(on)
    return [
        *_keys_round_p50(results),
        _row(
            "keys_rounds",
            f"gateway CPU per request (µs), {rounds}",
            _f(off_cpu, 0),
            _f(on_cpu, 0),
            _signed(on_cpu - off_cpu, 0),
            "",
            None,
            on_cpu,
        ),
        _row(
            "keys_rounds",
            f"requests/s, 8 clients, {rounds}",
            _f(off_rps),
            _f(on_rps),
            f"{on_rps / off_rps:.0%} of keys off",
            "",
            None,
            on_rps,
        ),
    ]


def _keys_round_p50(results: dict[str, dict[str, Any]]) -> list[Row]:
    """Added p50 with one client: in each round, keys on against the keys off just before it."""
    pairs = [
        (results[f"keys_r{i}_off_seq_v1"]["gateway"], results[n]["gateway"])
        for n in results
        if (m := re.fullmatch(r"keys_r(\d+)_seq_v1", n))
        and f"keys_r{(i := m.group(1))}_off_seq_v1" in results
    ]
    if not pairs:
        return []
    off_p50 = statistics.median(pct(off["latency_ms"], 50) for off, _ in pairs)
    on_p50 = statistics.median(pct(on["latency_ms"], 50) for _, on in pairs)
    added = statistics.median(
        pct(on["latency_ms"], 50) - pct(off["latency_ms"], 50) for off, on in pairs
    )
    return [
        _row(
            "keys_rounds",
            f"added p50 (ms), 1 client, median of {len(pairs)} rounds taken in turn",
            _f(off_p50),
            _f(on_p50),
            _signed(added),
            "≤ +0.3 ms",
            added <= 0.3,
            added,
        )
    ]


def table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into the README."""
    head = ("scenario", "measure", "direct", "gateway", "added / ratio", "target", "verdict")
    keys = ("scenario", "measure", "direct", "gateway", "delta", "target", "verdict")
    body = [[str(row[k]) for k in keys] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(lines)


def compact(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The raw results with latency lists replaced by their percentiles (for the JSON file)."""
    out: dict[str, Any] = {}
    for name, pair in results.items():
        out[name] = {}
        for side, r in pair.items():
            side_out = {}
            for key, value in r.items():
                if isinstance(value, list) and key.endswith("_ms"):
                    side_out[key] = {
                        f"p{q}": round(pct(value, q), 4) for q in (50, 90, 99, 99.9, 100)
                    } | {"count": len(value)}
                else:
                    side_out[key] = value
            out[name][side] = side_out
    return out


CHART_PANELS = (  # scenario, measure, title, x scale
    ("seq_v1", "latency_ms", "1 client, /v1/chat/completions", "log"),
    ("seq_chat", "latency_ms", "1 client, /chat", "log"),
    ("conc8_v1", "latency_ms", "8 clients, /v1", "log"),
    ("streams_500_50ms", "first_ms", "500 streams, 50 ms: first chunk", "log"),
    ("streams_5000_500ms", "first_ms", "5,000 streams, 500 ms: first chunk", "log"),
    # All near 1,500 ms: a log scale would show no tick at all.
    ("open_500rps", "latency_ms", "500 req/s offered, 1.5 s upstream", "linear"),
)


def chart(results: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """CDFs of direct vs gateway latency per scenario; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    panels = [p for p in CHART_PANELS if p[0] in results]
    if not panels:
        return False
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, key, label, scale) in zip(axes.flat, panels, strict=False):
        lines = [("direct", name, "direct", "#888888"), ("gateway", name, "gateway", "#1f6feb")]
        if name.startswith("streams_") and f"chat_{name}" in results:  # both routes, one panel
            lines[1] = ("gateway", name, f"gateway {STREAM_ROUTES['streams_']}", "#1f6feb")
            chat = STREAM_ROUTES["chat_streams_"]
            lines.append(("gateway", f"chat_{name}", f"gateway {chat}", "#d4722b"))
        for side, source, legend, colour in lines:
            values = sorted(results[source][side][key])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.plot(values, ys, color=colour, label=legend, linewidth=1.6)
        ax.set_xscale(scale)
        if scale == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("ms (log scale)" if scale == "log" else "ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
