"""Section ``latency``: publish->handler at a fixed 1,000 msg/s for 10 s (3 s with --quick).

Each producer stamps ``time.time()`` into the payload right before its own publish call and
each handler notes ``time.time() - t``, so the figure spans serialisation, Redis, the read loop
and dispatch. Modes: ``engine`` (``RedisTransport.add`` -> GroupConsumer), ``node``
(``MultiAgentCoordinator.send`` -> ``coordinator node``), ``baseline`` (one XADD -> XREADGROUP
BLOCK loop) and ``faststream`` (``broker.publish`` -> its one-at-a-time stream subscriber).
The first 50 messages of a run (connection warm-up) are not counted.

Every producer offers the same evenly spaced load (see ``loadgen.paced``): bursts would
queue messages behind each other and measure the burstiness of the producer's timers instead
of the path. Each run reports the 1st percentile of the time between two sends to show it.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from .harness import ChildFailed, Children
from .nodes import Nodes, delete_prefix, inbox, wait_groups
from .report import available, cell, latency_ms, mark, spread

MODES = ("engine", "node", "baseline", "faststream")
RATE = 1000.0
WARMUP = 50


def measure(url: str, mode: str, client: redis.Redis, run: int, seconds: float
            ) -> tuple[list[float], dict[str, float]]:
    """One paced run of ``mode``; returns the latencies (s) after the warm-up and the
    producer's send gaps (``loadgen.gaps_ms``)."""
    n = int(RATE * seconds)
    prefix = f"lat{run}{mode[:2]}{uuid.uuid4().hex[:6]}"
    stream = inbox(prefix, "bench")
    common = ["--url", url, "--prefix", prefix, "--stream", stream, "--agent", "bench",
              "--messages", str(n), "--rate", str(RATE), "--timeout-s", str(seconds + 60)]
    out = Path(tempfile.gettempdir()) / f"{prefix}.json"
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            consumer = None
            if mode == "node":
                nodes.start("node-1", "benchmarks.agents:latency=bench",
                            env={"BENCH_LAT_FILE": str(out), "BENCH_LAT_N": str(n)})
                wait_groups(client, [(stream, "bench")], nodes=nodes)
                producer_role = "node-producer"
            else:
                role = {"engine": "engine-lat", "baseline": "baseline-lat",
                        "faststream": "faststream"}[mode]
                consumer = children.spawn(mode, f"{role}-consumer", *common)
                consumer.expect("ready", 30)
                producer_role = f"{role}-producer"
            producer = children.spawn(f"{mode} producer", producer_role, *common)
            gaps = producer.expect("done", seconds + 60)["gaps"]
            if consumer is not None:
                latencies = consumer.expect("done", 30)["latencies"]
            else:
                deadline = time.monotonic() + 30
                while not out.exists():
                    nodes.check()
                    if time.monotonic() > deadline:
                        raise ChildFailed("node latency agent wrote no results")
                    time.sleep(0.05)
                latencies = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
        delete_prefix(client, f"{prefix}:*")
    if len(latencies) < n:
        raise ChildFailed(f"{mode}: {len(latencies)} of {n} messages handled")
    return latencies[WARMUP:], gaps


def run(url: str, client: redis.Redis, quick: bool, runs: int) -> dict[str, Any]:
    """``runs`` interleaved runs of every mode."""
    seconds = 3.0 if quick else 10.0
    rows: list[dict[str, Any]] = []
    modes = available(MODES)
    for r in range(runs):
        shift = r % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            latencies, gaps = measure(url, mode, client, r, seconds)
            rows.append({"run": r, "mode": mode, **latency_ms(latencies),
                         "send_gap_p1": gaps["p1"]})
    summary: dict[str, Any] = {}
    for mode in modes:
        these = [row for row in rows if row["mode"] == mode]
        summary[mode] = {k: spread([row[k] for row in these]) for k in ("p50", "p99", "max",
                                                                        "send_gap_p1")}
    base = summary["baseline"]["p99"]["median"]
    for mode in ("engine", "node"):
        summary[f"{mode}_p99_vs_baseline"] = summary[mode]["p99"]["median"] / base
    return {"section": "latency", "rate": RATE, "seconds": seconds, "warmup": WARMUP,
            "runs": rows, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    """The latency table."""
    s = result["summary"]
    lines = [f"### Latency publish->handler at {result['rate']:,.0f} msg/s for "
             f"{result['seconds']:.0f} s (ms, median (min-max) of runs)", "",
             "| mode | p50 | p99 | max | p99 vs baseline | send gap p1 |",
             "|---|---:|---:|---:|---:|---:|"]
    base = s["baseline"]["p99"]["median"]
    for mode in [m for m in MODES if m in s]:
        lines.append(f"| {mode} | {cell(s[mode]['p50'], '.2f')} | {cell(s[mode]['p99'], '.2f')}"
                     f" | {cell(s[mode]['max'], '.1f')} | "
                     f"{s[mode]['p99']['median'] / base:.2f} | "
                     f"{s[mode]['send_gap_p1']['median']:.2f} |")
    for mode in ("engine", "node"):
        v = s[f"{mode}_p99_vs_baseline"]
        lines.append(f"\n{mode} p99 / baseline p99 = {v:.2f} (target <= 1.5: {mark(v <= 1.5)})")
    return "\n".join(lines) + "\n"
