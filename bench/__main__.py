"""`python -m bench` (or `make bench`): run every scenario, print the table, write the JSON.

Starts the fake upstream and the gateway on 127.0.0.1 (gateway pinned to
core 0 with taskset, upstream and load generator on the other cores), runs
each scenario against the upstream directly and through the gateway, and
stops everything it started, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.procs import Upstream, cores
from bench.scenarios import PROFILES, SCENARIOS, Bench
from bench.upstream import raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "")
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def busy_processes(limit: float = 20.0) -> list[str]:
    """Other processes using CPU right now: they make every figure noisier."""
    try:
        done = subprocess.run(
            ["ps", "-eo", "pcpu=,pid=,comm="], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return []
    own = os.getpid()
    busy = []
    for line in done.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and float(parts[0]) >= limit and int(parts[1]) != own:
            busy.append(f"{parts[2]} (pid {parts[1]}, {parts[0]}% cpu)")
    return busy


def _loadavg(values: tuple[float, float, float]) -> str:
    """The 1-, 5- and 15-minute load averages: above the core count, figures are disturbed."""
    return " / ".join(f"{v:.2f}" for v in values)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, about a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable); default: all",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "bench-latency.png")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway, e.g. CHAT_API_LOG_LEVEL=warning (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    profile_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    raise_fd_limit()  # children inherit it: 5,000 streams need 10,000+ sockets
    gateway_cpus, other_cpus = ("", "") if args.no_pin else cores()
    chosen = args.scenario or list(SCENARIOS)
    started = time.monotonic()
    load_before = os.getloadavg()
    busy = busy_processes()
    if busy:
        print(f"bench: warning: other busy processes: {', '.join(busy)}", flush=True)
    print(
        f"bench: profile {profile_name}; gateway on cpu {gateway_cpus or 'any'}, "
        f"upstream and load generator on cpu {other_cpus or 'any'}; "
        f"load average {_loadavg(load_before)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="chat-api-bench-") as tmp:
        workdir = Path(tmp)
        upstream = Upstream(other_cpus, workdir)
        bench = Bench(
            profile,
            workdir,
            gateway_cpus,
            other_cpus,
            upstream,
            gateway_env=dict(item.split("=", 1) for item in args.gateway_env),
            log=lambda s: print(s, flush=True),
        )
        try:
            bench.fresh_gateway()
            for name in SCENARIOS:  # a fixed order, whatever order they were asked in
                if name in chosen:
                    print(f"scenario {name}", flush=True)
                    SCENARIOS[name](bench)
        except BaseException:
            for log in ("gateway.log", "upstream.log"):
                text = (workdir / log).read_text(errors="replace")[-3000:]
                if text.strip():
                    print(f"--- {log} (tail)\n{text}", file=sys.stderr)
            raise
        finally:
            bench.stop()
            upstream.stop()
    rows = report.summarize(bench.results)
    load_after = os.getloadavg()
    print()
    print(report.table(rows))
    print(f"\nload average: {_loadavg(load_before)} before, {_loadavg(load_after)} after")
    info = machine()
    summary = {
        "profile": profile_name,
        "command": "python -m bench"
        + (" --quick" if args.quick else " --smoke" if args.smoke else ""),
        "machine": info,
        "gateway_env": args.gateway_env,
        "pinning": {"gateway": gateway_cpus or None, "upstream_and_load": other_cpus or None},
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "busy_before": busy,
        "rows": rows,
        "results": report.compact(bench.results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    print(f"\nwrote {args.out}")
    if not args.no_chart:
        title = (
            f"chat-api gateway vs direct, one worker on one core "
            f"({info['cores']}-core {info['cpu'] or 'machine'}, loopback fake upstream)"
        )
        if report.chart(bench.results, args.chart, title):
            print(f"wrote {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
