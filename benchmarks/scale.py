"""Section ``scale``: node processes and agents.

- 1, 2 and 4 ``coordinator node`` processes serving one agent;
- one node serving 10 and 100 agents, the producer sending round robin over them.

The producer is one process calling ``MultiAgentCoordinator.send_many`` in batches of 500 (split
by agent, the parts sent concurrently, so they share round trips). Reported:
throughput (first send -> every entry acked) and how much Redis ``used_memory`` grew while
the run's messages sit in the streams (they are kept until retention trims them).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis

from .harness import Children
from .nodes import Nodes, delete_prefix, inbox, wait_acked, wait_groups
from .report import cell, spread

CONFIGS = ((1, 1), (2, 1), (4, 1), (1, 10), (1, 100))  # (nodes, agents)


def pool_for(agents: int) -> int | None:
    """The default pool (512, opened lazily) serves every size measured here; each consumer's
    blocking read holds one connection, so much larger nodes set ``redis.max_connections``."""
    return None


def measure(url: str, client: redis.Redis, run: int, nodes_n: int, agents: int,
            messages: int) -> dict[str, Any]:
    """One run of one configuration."""
    prefix = f"sc{run}n{nodes_n}a{agents}{uuid.uuid4().hex[:6]}"
    pairs = [(inbox(prefix, f"b{k}"), f"b{k}") for k in range(agents)]
    timeout = 60.0 + messages / 1000
    pool = pool_for(agents)
    config = Path(tempfile.gettempdir()) / f"{prefix}.yaml"
    extra: list[str] = []
    if pool:
        config.write_text(f"eventbus:\n  redis:\n    max_connections: {pool}\n")
        extra = ["--config", str(config)]
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            for i in range(nodes_n):
                nodes.start(f"node-{i + 1}", "benchmarks.agents:many",
                            env={"BENCH_AGENTS": str(agents)}, extra=extra)
            wait_groups(client, pairs, timeout_s=60, nodes=nodes)
            memory0 = int(client.info("memory")["used_memory"])
            producer = children.spawn("producer", "node-producer", "--url", url, "--prefix",
                                      prefix, "--agent", "b0", "--agents", str(agents),
                                      "--messages", str(messages))
            sent = producer.expect("done", timeout)
            t_done = wait_acked(client, pairs, messages, timeout, nodes)
            memory1 = int(client.info("memory")["used_memory"])
    finally:
        config.unlink(missing_ok=True)
        delete_prefix(client, f"{prefix}:*")
    seconds = t_done - sent["t_first"]
    return {"msgs_per_s": messages / seconds, "seconds": seconds,
            "send_seconds": sent["t_last"] - sent["t_first"],
            "redis_memory_growth_mb": (memory1 - memory0) / 2**20,
            "redis_bytes_per_msg": (memory1 - memory0) / messages}


def run(url: str, client: redis.Redis, quick: bool, runs: int) -> dict[str, Any]:
    """``runs`` interleaved runs of every configuration."""
    messages = 4_000 if quick else 50_000
    rows: list[dict[str, Any]] = []
    for r in range(runs):
        shift = r % len(CONFIGS)
        for nodes_n, agents in CONFIGS[shift:] + CONFIGS[:shift]:
            rows.append({"run": r, "nodes": nodes_n, "agents": agents, **measure(
                url, client, r, nodes_n, agents, messages)})
    summary = []
    for nodes_n, agents in CONFIGS:
        these = [row for row in rows if (row["nodes"], row["agents"]) == (nodes_n, agents)]
        summary.append({"nodes": nodes_n, "agents": agents, **{
            k: spread([row[k] for row in these])
            for k in ("msgs_per_s", "send_seconds", "redis_memory_growth_mb",
                      "redis_bytes_per_msg")}})
    return {"section": "scale", "messages": messages, "runs": rows, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    """The scale table."""
    lines = [f"### Scale: {result['messages']:,} messages per run, 200 B payload "
             "(median (min-max) of runs)", "",
             "| nodes | agents | msg/s | producer send s | Redis used_memory growth MB | "
             "Redis bytes/msg | node pool |", "|---:|---:|---:|---:|---:|---:|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['nodes']} | {s['agents']} | {cell(s['msgs_per_s'])} | "
                     f"{cell(s['send_seconds'], '.2f')} | "
                     f"{cell(s['redis_memory_growth_mb'], '.1f')} | "
                     f"{cell(s['redis_bytes_per_msg'], ',.0f')} | "
                     f"{pool_for(s['agents']) or 'default'} |")
    return "\n".join(lines) + "\n"
