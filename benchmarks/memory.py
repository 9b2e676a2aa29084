"""Section ``memory``: RSS of a node process serving a trivial agent.

Idle: 2 s after its consumer group exists, with a probe message confirming that LangGraph is
not imported in it. Then a warm-up of 10,000 messages (RSS noted) and 100,000 more (RSS noted;
--quick: 2,000 and 20,000). Targets: idle < 80 MB; growth over the 100,000 messages < 10%
(against the idle RSS, and against the RSS after warm-up, which excludes one-time buffers).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from .harness import ChildFailed, Children
from .nodes import Nodes, delete_prefix, inbox, rss_mb, wait_acked, wait_groups
from .report import cell, mark, spread

IDLE_TARGET_MB = 80.0
GROWTH_TARGET = 0.10


def _send(children: Children, url: str, prefix: str, messages: int) -> None:
    producer = children.spawn("producer", "node-producer", "--url", url, "--prefix", prefix,
                              "--agent", "bench", "--messages", str(messages))
    producer.expect("done", 60 + messages / 500)
    producer.finish()


def measure(url: str, client: redis.Redis, run: int, warmup: int, messages: int
            ) -> dict[str, Any]:
    """One node: idle, after warm-up, after ``messages`` more."""
    prefix = f"mem{run}{uuid.uuid4().hex[:6]}"
    pairs = [(inbox(prefix, "bench"), "bench")]
    probe = f"{prefix}:probe"
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            pid = nodes.start("node-1", "benchmarks.agents:sink=bench").pid
            wait_groups(client, pairs, nodes=nodes)
            time.sleep(2.0)
            idle = rss_mb(pid)
            client.xadd(pairs[0][0], {b"e": _probe_envelope(probe)})
            deadline = time.monotonic() + 10
            while not client.scard(probe):
                nodes.check()
                if time.monotonic() > deadline:
                    raise ChildFailed("memory: the probe message was not handled")
                time.sleep(0.02)
            langgraph = b"langgraph=1" in client.smembers(probe)
            _send(children, url, prefix, warmup)
            wait_acked(client, pairs, warmup + 1, 60 + warmup / 500, nodes)
            warm = rss_mb(pid)
            _send(children, url, prefix, messages)
            wait_acked(client, pairs, warmup + messages + 1, 60 + messages / 500, nodes)
            after = rss_mb(pid)
    finally:
        delete_prefix(client, f"{prefix}:*")
    return {"idle_rss_mb": idle, "warm_rss_mb": warm, "after_rss_mb": after,
            "growth_vs_idle": after / idle - 1, "growth_vs_warm": after / warm - 1,
            "langgraph_imported": langgraph}


def _probe_envelope(key: str) -> bytes:
    from coordinator import codec
    from coordinator.producer import make_envelope

    return codec.encode(make_envelope("bench", {"probe": key}))


def run(url: str, client: redis.Redis, quick: bool, runs: int) -> dict[str, Any]:
    """``runs`` nodes, one after the other."""
    warmup, messages = (2_000, 20_000) if quick else (10_000, 100_000)
    rows = [{"run": r, **measure(url, client, r, warmup, messages)} for r in range(runs)]
    summary = {k: spread([row[k] for row in rows]) for k in (
        "idle_rss_mb", "warm_rss_mb", "after_rss_mb", "growth_vs_idle", "growth_vs_warm")}
    summary["langgraph_imported"] = any(row["langgraph_imported"] for row in rows)
    return {"section": "memory", "warmup": warmup, "messages": messages, "runs": rows,
            "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    """The memory table."""
    s = result["summary"]
    idle = s["idle_rss_mb"]["max"]
    growth = s["growth_vs_idle"]["median"]
    pct = {k: {m: v * 100 if m != "runs" else v for m, v in s[k].items()}
           for k in ("growth_vs_idle", "growth_vs_warm")}
    return "\n".join([
        f"### Node RSS, trivial agent, LangGraph imported: {s['langgraph_imported']} "
        "(MiB, median (min-max) of runs)", "",
        f"| idle | after {result['warmup']:,} msgs | after {result['messages']:,} more | "
        "growth vs idle | growth vs warm |", "|---:|---:|---:|---:|---:|",
        f"| {cell(s['idle_rss_mb'], '.1f')} | {cell(s['warm_rss_mb'], '.1f')} | "
        f"{cell(s['after_rss_mb'], '.1f')} | {cell(pct['growth_vs_idle'], '.1f')}% | "
        f"{cell(pct['growth_vs_warm'], '.1f')}% |", "",
        f"idle < {IDLE_TARGET_MB:.0f} MB without LangGraph: "
        f"{mark(idle < IDLE_TARGET_MB and not s['langgraph_imported'])}; "
        f"growth < {GROWTH_TARGET:.0%}: {mark(growth < GROWTH_TARGET)}", ""])
