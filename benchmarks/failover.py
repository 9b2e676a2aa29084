"""Section ``failover``: SIGKILL a node that holds 1,000 in-flight messages.

A victim node (``--concurrency 1000``, a handler that would work for 10 minutes) takes all
1,000 messages; a peer node (default concurrency, a handler that finishes at once and records
the message as done in a Redis set) joins; then the victim is SIGKILLed. Measured: the time
from the kill until the last message is done on the peer, and until the last is acked, and how
many never finished (lost). Both nodes run with ``--heartbeat-ttl-ms 1000``; the target is
TTL + 1 s.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from .harness import ChildFailed, Children
from .nodes import Nodes, acked, delete_prefix, inbox, wait_groups
from .report import cell, mark, spread

MESSAGES = 1_000
TTL_MS = 1_000


def _wait(what: str, check: Any, timeout_s: float, nodes: Nodes) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        nodes.check()
        if time.monotonic() > deadline:
            raise ChildFailed(f"failover: {what} not within {timeout_s:.0f}s")
        time.sleep(0.01)


def measure(url: str, client: redis.Redis, run: int) -> dict[str, Any]:
    """One kill; returns recovery times and the lost count."""
    prefix = f"fo{run}{uuid.uuid4().hex[:6]}"
    stream, done_key = inbox(prefix, "bench"), f"{prefix}:done"
    ttl = ["--heartbeat-ttl-ms", str(TTL_MS)]
    try:
        with Children() as children, Nodes(url, prefix) as nodes:
            nodes.start("victim", "benchmarks.agents:slow=bench",
                        env={"BENCH_SLEEP_MS": "600000", "BENCH_DONE_KEY": done_key},
                        extra=[*ttl, "--concurrency", str(MESSAGES)])
            wait_groups(client, [(stream, "bench")], nodes=nodes)
            producer = children.spawn("producer", "node-producer", "--url", url, "--prefix",
                                      prefix, "--agent", "bench", "--messages", str(MESSAGES))
            producer.expect("done", 60)
            _wait("victim holding every message",
                  lambda: client.xpending(stream, "bench")["pending"] >= MESSAGES, 30, nodes)
            nodes.start("peer", "benchmarks.agents:slow=bench",
                        env={"BENCH_SLEEP_MS": "0", "BENCH_DONE_KEY": done_key}, extra=ttl)
            _wait("peer consuming", lambda: any(
                c["name"] in (b"peer", "peer") for c in client.xinfo_consumers(stream, "bench")),
                30, nodes)
            nodes.kill("victim")
            killed = time.monotonic()
            t_first = t_done = t_acked = None
            deadline = killed + TTL_MS / 1000 + 30
            while time.monotonic() < deadline and (t_done is None or t_acked is None):
                now = time.monotonic()
                count = client.scard(done_key)
                if t_first is None and count:
                    t_first = now
                if t_done is None and count >= MESSAGES:
                    t_done = now
                if t_acked is None and acked(client, [(stream, "bench")])[1] == 0:
                    t_acked = now
                time.sleep(0.005)
            finished = client.scard(done_key)
    finally:
        delete_prefix(client, f"{prefix}:*")
    return {"first_done_s": None if t_first is None else t_first - killed,
            "recovery_s": None if t_done is None else t_done - killed,
            "all_acked_s": None if t_acked is None else t_acked - killed,
            "finished": finished, "lost": MESSAGES - finished}


def run(url: str, client: redis.Redis, quick: bool, runs: int) -> dict[str, Any]:
    """``runs`` kills."""
    rows = [{"run": r, **measure(url, client, r)} for r in range(runs)]
    summary: dict[str, Any] = {"lost": spread([row["lost"] for row in rows])}
    for key in ("first_done_s", "recovery_s", "all_acked_s"):
        values = [row[key] for row in rows if row[key] is not None]
        summary[key] = spread(values) if values else None
    return {"section": "failover", "messages": MESSAGES, "heartbeat_ttl_ms": TTL_MS,
            "target_s": TTL_MS / 1000 + 1, "runs": rows, "summary": summary}


def markdown(result: dict[str, Any]) -> str:
    """The failover table."""
    s, target = result["summary"], result["target_s"]
    first, rec, ack = s["first_done_s"], s["recovery_s"], s["all_acked_s"]
    worst = max((r["recovery_s"] or float("inf")) for r in result["runs"])
    return "\n".join([
        f"### Failover: SIGKILL of a node holding {result['messages']:,} in-flight messages, "
        f"heartbeat TTL {result['heartbeat_ttl_ms']} ms (median (min-max) of runs)", "",
        "| first done on peer, s | last done on peer, s | last acked, s | lost |",
        "|---:|---:|---:|---:|",
        f"| {cell(first, '.2f') if first else 'never'} | {cell(rec, '.2f') if rec else 'never'} | {cell(ack, '.2f') if ack else 'never'} | "
        f"{cell(s['lost'], '.0f')} |", "",
        f"every run <= TTL + 1 s = {target:.1f} s with 0 lost: "
        f"{mark(worst <= target and s['lost']['max'] == 0)}", ""])
