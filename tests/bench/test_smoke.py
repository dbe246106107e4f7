"""The benchmark still runs end to end: a tiny version of `make bench`, in seconds.

Timing is not asserted here (that is what the full bench and the README are
for); what is asserted is that every scenario ran against both targets and
every request completed, so the bench cannot silently rot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bench.scenarios import PROFILES

ROOT = Path(__file__).resolve().parents[2]


def asked_for(name: str) -> int:
    """How many calls the smoke profile sends in scenario `name` (what the bench must report)."""
    name = re.sub(r"^keys_r\d+_(off_)?", "keys_", name)  # the interleaved keys rounds
    smoke = PROFILES["smoke"]
    rate, duration, _ = smoke["open"]
    sizes = {
        "seq": smoke["seq"],
        "conc8": smoke["conc"],
        "relay": 1,
        f"open_{rate}rps": int(rate * duration),
        **{f"streams_{count}_{int(gap * 1000)}ms": count for count, gap in smoke["streams"]},
    }
    for prefix in ("", "keys_", "floor_", "responses_", "chat_", "workers2_"):
        for kind, count in sizes.items():
            if name in (f"{prefix}{kind}", f"{prefix}{kind}_v1", f"{prefix}{kind}_chat"):
                return int(count)
    raise AssertionError(f"the smoke test does not know scenario {name!r}")


@pytest.mark.slow
def test_smoke_bench_prints_the_table_and_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-chart", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "| scenario" in done.stdout
    assert "latency p50 (ms)" in done.stdout

    summary = json.loads(out.read_text())
    results = summary["results"]
    expected = {"seq_v1", "seq_chat", "conc8_v1", "relay", "floor_conc8_v1"}
    assert expected <= set(results)
    assert any(name.startswith("streams_") for name in results)
    chat_streams = {n for n in results if n.startswith("streams_")}
    responses_streams = {n for n in results if n.startswith("responses_streams_")}
    assert responses_streams == {f"responses_{n}" for n in chat_streams}  # side by side
    simple_streams = {n for n in results if n.startswith("chat_streams_")}
    assert simple_streams == {f"chat_{n}" for n in chat_streams}  # /chat/stream beside /v1
    for name in chat_streams | simple_streams:
        measures = {row["measure"] for row in summary["rows"] if row["scenario"] == name}
        assert "first chunk p99 (ms)" in measures, (name, measures)
    for name in responses_streams:
        gateway = results[name]["gateway"]
        assert 0 < gateway["first_ms"]["p99"] <= gateway["latency_ms"]["p99"], gateway
        assert gateway["rss_per_stream_kib"] is not None
        measures = {row["measure"] for row in summary["rows"] if row["scenario"] == name}
        assert {"first event p99 (ms)", "completed"} <= measures, measures
    assert any(name.startswith("open_") for name in results)
    for name, pair in results.items():
        for side in ("direct", "gateway"):
            run = pair[side]
            assert run["requested"] == asked_for(name), (name, side, run["requested"])
            assert run["completed"] == run["requested"], (name, side, run)
            assert run["failed"] == 0, (name, side, run)
            latency = run["latency_ms"]
            assert latency["count"] == run["completed"]
            assert 0 < latency["p50"] <= latency["p99"], (name, side, latency)
        assert pair["gateway"]["rss_peak_kib"] > 0
    assert results["conc8_v1"]["gateway"]["rps"] > 0
    assert results["relay"]["gateway"]["events_per_s"] > 0
    verdicts = [row["verdict"] for row in summary["rows"]]
    assert "met" in verdicts or "MISSED" in verdicts, "no row was held to a target"
    assert set(verdicts) <= {"met", "MISSED", "—"}, verdicts
