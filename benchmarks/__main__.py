"""``python -m benchmarks``: the whole suite, one Redis, sections in one invocation.

Sections (``--only a,b``): throughput, latency, reqrep, failover, scale, memory. Every section
prints a markdown table as it finishes; the JSON (``--json``) holds every run of every section
and is rewritten after each one, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from .harness import machine_info, terminate_as_exit
from .report import write_json

SECTIONS = {"throughput": "e2e", "latency": "latency", "reqrep": "reqrep",
            "failover": "failover", "scale": "scale", "memory": "memory"}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "suite.json"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Kiki Coordinator against a hand-written redis-py loop, FastStream and "
                    "taskiq-redis, interleaved on one private Redis.")
    parser.add_argument("--quick", action="store_true",
                        help="one run of each, small counts (< 90 s; what CI runs)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per figure (default 3, 1 with --quick)")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis instead of starting a private redis-server")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the results (default {DEFAULT_JSON})")
    opts = parser.parse_args(argv)
    opts.sections = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = [s for s in opts.sections if s not in SECTIONS]
    if unknown or not opts.sections:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    opts.runs = opts.runs or (1 if opts.quick else 3)
    if opts.runs < 1:
        parser.error("--runs must be positive")
    return opts


def run_suite(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every selected section in order; prints each table as it is done."""
    client = redis.Redis.from_url(url)
    result: dict[str, Any] = {"machine": machine_info(client), "quick": args.quick,
                              "runs": args.runs, "sections": {}}
    try:
        for name in args.sections:
            module = importlib.import_module(f"benchmarks.{SECTIONS[name]}")
            started = time.monotonic()
            print(f"\n## {name}\n", flush=True)
            section = module.run(url, client, args.quick, args.runs)
            section["wall_seconds"] = time.monotonic() - started
            result["sections"][name] = section
            print(module.markdown(section), flush=True)
            write_json(result, args.json)
    finally:
        client.close()
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite, write JSON, print the tables."""
    args = parse(argv)
    terminate_as_exit()
    started = time.monotonic()
    if args.redis_url:
        result = run_suite(args.redis_url, args)
    else:
        from coordinator.embedded import EmbeddedRedis

        with EmbeddedRedis() as server:
            result = run_suite(server.url, args)
    result["wall_seconds"] = time.monotonic() - started
    write_json(result, args.json)
    machine = result["machine"]
    print(f"\n{machine['cpu_count']} CPUs, {machine['platform']}, Python {machine['python']}, "
          f"Redis {machine['redis_version']}, load {machine['load_avg_start']} -> "
          f"{machine['load_avg_end']}")
    print(f"wrote {args.json} in {result['wall_seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
