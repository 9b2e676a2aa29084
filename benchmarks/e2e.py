"""Section ``throughput``: producer process -> consumer process -> ack, every implementation.

Modes, interleaved in one run on one Redis (the order rotates every run):

- ``engine`` / ``baseline``: :mod:`benchmarks.throughput` (GroupConsumer vs the hand-written
  redis-py loop, pipelined XADD batches);
- ``node``: the product path, ``MultiAgentCoordinator.send_many`` in batches of 500 from one
  process -> a ``coordinator node`` process serving a trivial agent (default settings, so
  lifecycle events on: ``agent:started`` and ``agent:completed`` per message);
- ``node-quiet``: the same with lifecycle events off (``KIKI_PUBLISH_EVENTS=false``), which
  prices the events path;
- ``node-traced``: the same as ``node`` with the OpenTelemetry SDK's tracer provider in
  producer and node (every message traced, batch span processor to an exporter that drops
  everything, see :mod:`benchmarks.tracing`), which prices tracing;
- ``node-traced-10``: the same with 10% of traces sampled (parent-based, so a trace is
  recorded on both sides or on neither);
- ``faststream-batch`` / ``faststream-single`` / ``taskiq``: see :mod:`benchmarks.peers`.

Throughput is N over the time from the producer's first send to the moment Redis shows every
entry read and acknowledged by the consumer group. Payloads of 200 B and 8 KB.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from . import throughput
from .harness import Children, redis_cpu_s
from .nodes import Nodes, cpu_of, delete_prefix, inbox, wait_acked, wait_groups
from .report import available, cell, mark, spread

MODES = ("engine", "baseline", "node", "node-quiet", "node-traced", "node-traced-10",
         "faststream-batch", "faststream-single", "taskiq")
#: Environment of the node and producer processes of each product mode.
NODE_ENV = {"node": {}, "node-quiet": {"KIKI_PUBLISH_EVENTS": "false"},
            "node-traced": {"BENCH_TRACING": "1"}, "node-traced-10": {"BENCH_TRACING": "0.1"}}
PAYLOADS = (200, 8192)
FASTSTREAM_BATCH = 500  # max_records of the batch subscriber (its best of 100/500/1000 here)


def _messages(quick: bool, payload_bytes: int) -> int:
    if quick:
        return 4_000 if payload_bytes < 1000 else 2_000
    return 50_000 if payload_bytes < 1000 else 20_000


def measure(url: str, mode: str, client: redis.Redis, run: int, messages: int,
            payload_bytes: int) -> dict[str, Any]:
    """One run of one mode; returns its numbers."""
    if mode in ("engine", "baseline"):
        opts = throughput.Options(url, messages, 1, 500, payload_bytes)
        row = throughput.measure(opts, mode, client, run)
        return {k: row[k] for k in ("msgs_per_s", "seconds", "send_seconds",
                                    "consumer_cpu_us_per_msg", "producer_cpu_us_per_msg",
                                    "redis_cpu_us_per_msg")}
    prefix = f"bench{run}{mode[:2]}{uuid.uuid4().hex[:6]}"
    timeout = 30.0 + messages / 500
    common = ["--url", url, "--prefix", prefix, "--messages", str(messages),
              "--payload-bytes", str(payload_bytes), "--agent", "bench",
              "--timeout-s", str(timeout + 30)]
    env: dict[str, str] = NODE_ENV.get(mode, {})
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            if mode in NODE_ENV:
                pid = nodes.start("node-1", "benchmarks.agents:sink=bench", env=env).pid
                pairs = [(inbox(prefix, "bench"), "bench")]
                producer_role = "node-producer"
            else:
                tool, _, variant = mode.partition("-")
                stream = f"{prefix}:peer"
                common += ["--stream", stream, "--mode", variant or "single",
                           "--batch", str(FASTSTREAM_BATCH)]
                consumer = children.spawn(mode, f"{tool}-consumer", *common)
                consumer.expect("ready", 30)
                pid = consumer.process.pid
                pairs = [(stream, "bench")]
                producer_role = f"{tool}-producer"
            wait_groups(client, pairs, nodes=nodes)
            cpu0, redis0 = cpu_of(pid), redis_cpu_s(client)
            producer = children.spawn(f"{mode} producer", producer_role, *common, env=env)
            sent = producer.expect("done", timeout)
            t_done = wait_acked(client, pairs, messages, timeout, nodes)
            cpu, redis_cpu = cpu_of(pid) - cpu0, redis_cpu_s(client) - redis0
    finally:
        delete_prefix(client, f"{prefix}:*")
    seconds = t_done - sent["t_first"]
    return {"msgs_per_s": messages / seconds, "seconds": seconds,
            "send_seconds": sent["t_last"] - sent["t_first"],
            "consumer_cpu_us_per_msg": cpu * 1e6 / messages,
            "producer_cpu_us_per_msg": sent["cpu_s"] * 1e6 / messages,
            "redis_cpu_us_per_msg": redis_cpu * 1e6 / messages}


def run(url: str, client: redis.Redis, quick: bool, runs: int,
        modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Every payload size, every mode, ``runs`` interleaved runs."""
    rows: list[dict[str, Any]] = []
    modes = available(modes)
    for payload_bytes in PAYLOADS:
        messages = _messages(quick, payload_bytes)
        for r in range(runs):
            shift = r % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                row = measure(url, mode, client, r, messages, payload_bytes)
                rows.append({"payload_bytes": payload_bytes, "messages": messages, "run": r,
                             "mode": mode, **row})
    return {"section": "throughput", "runs": rows, "summary": summarize(rows, modes)}


def summarize(rows: list[dict[str, Any]], modes: tuple[str, ...]) -> dict[str, Any]:
    """Per payload and mode: rates, CPU, and the target ratios."""
    out: dict[str, Any] = {}
    for payload_bytes in PAYLOADS:
        mine = [r for r in rows if r["payload_bytes"] == payload_bytes]
        if not mine:
            continue
        per: dict[str, Any] = {}
        for mode in modes:
            these = [r for r in mine if r["mode"] == mode]
            per[mode] = {"msgs_per_s": spread([r["msgs_per_s"] for r in these]),
                         "consumer_cpu_us_per_msg": spread(
                             [r["consumer_cpu_us_per_msg"] for r in these]),
                         "send_seconds": spread([r["send_seconds"] for r in these])}
        med = {m: per[m]["msgs_per_s"]["median"] for m in modes}
        if "node" in med and "baseline" in med:
            per["node_vs_baseline"] = med["node"] / med["baseline"]
        if "node" in med and "node-quiet" in med:
            per["events_cost"] = 1 - med["node"] / med["node-quiet"]
        if "node" in med and "node-traced" in med:
            per["tracing_cost"] = 1 - med["node-traced"] / med["node"]
        if "node" in med and "node-traced-10" in med:
            per["tracing_10_cost"] = 1 - med["node-traced-10"] / med["node"]
        fast = [med[m] for m in ("faststream-batch", "faststream-single") if m in med]
        if "node" in med and fast:
            per["node_vs_best_faststream"] = med["node"] / max(fast)
        out[str(payload_bytes)] = per
    return out


def markdown(result: dict[str, Any]) -> str:
    """One table per payload size."""
    lines: list[str] = []
    for payload, per in result["summary"].items():
        modes = [m for m in per if isinstance(per[m], dict)]
        n = next(r["messages"] for r in result["runs"] if str(r["payload_bytes"]) == payload)
        base = per.get("baseline", {}).get("msgs_per_s", {}).get("median")
        lines += [f"### Throughput, {payload} B payload, {n:,} messages per run "
                  "(median (min-max) msg/s)", "",
                  "| mode | msg/s | vs baseline | consumer CPU us/msg | producer send s |",
                  "|---|---:|---:|---:|---:|"]
        for m in modes:
            rate = per[m]["msgs_per_s"]
            ratio = f"{rate['median'] / base:.2f}" if base else "-"
            lines.append(f"| {m} | {cell(rate)} | {ratio} | "
                         f"{cell(per[m]['consumer_cpu_us_per_msg'], '.1f')} | "
                         f"{cell(per[m]['send_seconds'], '.2f')} |")
        if "node_vs_baseline" in per:
            lines.append(f"\nnode / baseline = {per['node_vs_baseline']:.2f} (target >= 0.8: "
                         f"{mark(per['node_vs_baseline'] >= 0.8)})")
        if "node_vs_best_faststream" in per:
            v = per["node_vs_best_faststream"]
            lines.append(f"node / best FastStream = {v:.2f} (target >= 2.5: {mark(v >= 2.5)})")
        if "events_cost" in per:
            v = per["events_cost"]
            lines.append(f"lifecycle events cost {v:.0%} of node-quiet's throughput "
                         f"(target <= 15%: {mark(v <= 0.15)})")
        if "tracing_cost" in per:
            v = per["tracing_cost"]
            lines.append(f"tracing every message costs {v:.0%} of node's throughput "
                         f"(target <= 25%: {mark(v <= 0.25)})")
        if "tracing_10_cost" in per:
            v = per["tracing_10_cost"]
            lines.append(f"tracing with 10% of traces sampled costs {v:.0%} of node's "
                         f"throughput (target <= 25%: {mark(v <= 0.25)})")
        lines.append("")
    return "\n".join(lines)


def options_for(quick: bool) -> dict[str, Any]:
    """What the section runs with (for the JSON)."""
    return {"messages": {str(p): _messages(quick, p) for p in PAYLOADS},
            "faststream_max_records": FASTSTREAM_BATCH, "producer_tasks": 64}


