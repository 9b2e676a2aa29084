"""Section ``reqrep``: request/reply round trips with 64 concurrent callers.

A caller process runs ``MultiAgentCoordinator.request`` from 64 tasks against a ``coordinator
node`` process serving an echo agent, for 10 s (3 s with --quick) after a 0.5 s warm-up.
Reported: round trips per second and the p50/p99 of one round trip.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from .harness import Children
from .nodes import Nodes, delete_prefix, inbox, wait_groups
from .report import cell, latency_ms, mark, spread

CALLERS = 64
TARGET = 5_000


def measure(url: str, client: redis.Redis, run: int, seconds: float) -> dict[str, Any]:
    """One run; returns rate and latency percentiles."""
    prefix = f"rr{run}{uuid.uuid4().hex[:6]}"
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            nodes.start("node-1", "benchmarks.agents:echo")
            wait_groups(client, [(inbox(prefix, "echo"), "echo")], nodes=nodes)
            caller = children.spawn("caller", "reqrep-client", "--url", url, "--prefix", prefix,
                                    "--agent", "echo", "--messages", "0",
                                    "--concurrency", str(CALLERS),
                                    "--duration-s", str(seconds))
            done = caller.expect("done", seconds + 60)
    finally:
        delete_prefix(client, f"{prefix}:*")
    latencies = done["latencies"]
    return {"round_trips_per_s": len(latencies) / done["seconds"], **latency_ms(latencies)}


def run(url: str, client: redis.Redis, quick: bool, runs: int) -> dict[str, Any]:
    """``runs`` runs."""
    seconds = 3.0 if quick else 10.0
    rows = [{"run": r, **measure(url, client, r, seconds)} for r in range(runs)]
    summary = {k: spread([row[k] for row in rows])
               for k in ("round_trips_per_s", "p50", "p99", "max")}
    return {"section": "reqrep", "callers": CALLERS, "seconds": seconds, "runs": rows,
            "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    """The request/reply table."""
    s = result["summary"]
    rate = s["round_trips_per_s"]["median"]
    return "\n".join([
        f"### Request/reply, {result['callers']} concurrent callers, {result['seconds']:.0f} s "
        "(median (min-max) of runs)", "",
        "| round trips/s | p50 ms | p99 ms | max ms |", "|---:|---:|---:|---:|",
        f"| {cell(s['round_trips_per_s'])} | {cell(s['p50'], '.2f')} | {cell(s['p99'], '.2f')} "
        f"| {cell(s['max'], '.1f')} |", "",
        f"round trips/s >= {TARGET:,}: {mark(rate >= TARGET)}", ""])
