"""End-to-end throughput: producer process -> consumer process -> ack, engine vs baseline.

For each run, on one Redis server and with a fresh key prefix each time, it measures:

- ``engine``: a producer process sending envelopes through ``RedisTransport.add_many`` and a
  consumer process running a :class:`GroupConsumer` (default :class:`DeliveryConfig`) whose
  handler decodes the payload;
- ``baseline``: the same bytes and the same work done by the best hand-written redis-py loop.

Engine and baseline alternate inside one invocation (their order flips every run), so machine
noise hits both. Throughput is N divided by the time from the producer's first send to the
consumer's last ack (``time.time()`` across processes of one machine). CPU seconds of the
consumer, producer and Redis server are reported per message as well: they are much less
sensitive to a noisy machine than wall-clock rates.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from .harness import Children, calls_between, machine_info, redis_calls, redis_cpu_s, summary
from .workers import baseline_message

MODES = ("engine", "baseline")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "throughput.json"


@dataclass(frozen=True)
class Options:
    """What one invocation measures."""

    url: str
    messages: int = 100_000
    runs: int = 3
    batch: int = 500
    payload_bytes: int = 200
    quick: bool = False

    @property
    def timeout_s(self) -> float:
        """How long one side of one run may take before it counts as hung."""
        return 20.0 + self.messages / 2_000


def check_same_bytes() -> None:
    """Both implementations must put identical bytes on the wire, or the comparison is off.

    :raises AssertionError: if the baseline's hand-built envelope differs from the engine's
    """
    import msgspec

    from coordinator import codec
    from coordinator.envelope import Envelope

    payload = {"seq": 1, "text": "x" * 40}
    engine = codec.encode(Envelope(id="m1", target="bench", created_ms=1_700_000_000_000,
                                   payload=codec.encode_payload(payload)))
    baseline = msgspec.msgpack.encode(baseline_message(
        "m1", "bench", 1_700_000_000_000, msgspec.msgpack.encode(payload)))
    if engine != baseline:
        raise AssertionError("baseline envelope bytes differ from the engine's envelope")


def measure(opts: Options, mode: str, client: redis.Redis, run: int) -> dict[str, Any]:
    """One producer/consumer pair of ``mode``; returns the run's numbers."""
    prefix = f"bench{run}{mode[0]}{uuid.uuid4().hex[:6]}"
    stream = f"{prefix}:{{a:bench}}:stream"  # the engine's inbox key, so both use the same
    common = ["--url", opts.url, "--prefix", prefix, "--stream", stream,
              "--messages", str(opts.messages), "--batch", str(opts.batch),
              "--payload-bytes", str(opts.payload_bytes), "--timeout-s", str(opts.timeout_s)]
    try:
        with Children() as children:
            consumer = children.spawn(f"{mode} consumer", f"{mode}-consumer", *common)
            consumer.expect("ready", 30)
            redis_cpu0, calls0 = redis_cpu_s(client), redis_calls(client)
            producer = children.spawn(f"{mode} producer", f"{mode}-producer", *common)
            sent = producer.expect("done", opts.timeout_s)
            done = consumer.expect("done", opts.timeout_s)
            redis_cpu = redis_cpu_s(client) - redis_cpu0
            calls = calls_between(calls0, redis_calls(client))
            producer.finish()
            consumer.finish()
    finally:
        client.delete(*(client.keys(f"{prefix}:*") or [f"{prefix}:none"]))
    if done["acked"] != opts.messages:
        raise AssertionError(f"{mode}: acked {done['acked']} of {opts.messages}")
    seconds = done["t_done"] - sent["t_first"]
    per_msg_us = 1e6 / opts.messages
    return {"run": run, "mode": mode, "msgs_per_s": opts.messages / seconds,
            "seconds": seconds, "send_seconds": sent["t_last"] - sent["t_first"],
            "consumer_cpu_us_per_msg": done["cpu_s"] * per_msg_us,
            "producer_cpu_us_per_msg": sent["cpu_s"] * per_msg_us,
            "redis_cpu_us_per_msg": redis_cpu * per_msg_us,
            "handled": done["handled"], "redis_calls": calls,
            "msgs_per_read": opts.messages / max(1, calls.get("xreadgroup", 0))}


def run_all(opts: Options) -> dict[str, Any]:
    """Every run, engine and baseline interleaved; returns the result document."""
    check_same_bytes()
    client = redis.Redis.from_url(opts.url)
    try:
        machine = machine_info(client)
        runs: list[dict[str, Any]] = []
        for run in range(opts.runs):
            order = MODES if run % 2 == 0 else MODES[::-1]
            for mode in order:
                runs.append(measure(opts, mode, client, run))
    finally:
        client.close()
    machine["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return build_result(opts, machine, runs)


def build_result(opts: Options, machine: dict[str, Any], runs: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    """The JSON document: medians first, then distributions and every run."""
    by_mode = {m: sorted((r for r in runs if r["mode"] == m), key=lambda r: r["run"])
               for m in MODES}
    rates = {m: [r["msgs_per_s"] for r in by_mode[m]] for m in MODES}
    engine, baseline = summary(rates["engine"]), summary(rates["baseline"])
    paired = [e / b for e, b in zip(rates["engine"], rates["baseline"])]
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "engine_msgs_per_s": engine["median"],
        "baseline_msgs_per_s": baseline["median"],
        "ratio": engine["median"] / baseline["median"],
        "ratio_per_run": summary(paired) | {"runs": paired},
        "engine": engine | {"runs": rates["engine"]},
        "baseline": baseline | {"runs": rates["baseline"]},
        "cpu_us_per_msg": {
            m: {side: summary([r[f"{side}_cpu_us_per_msg"] for r in by_mode[m]])["median"]
                for side in ("consumer", "producer", "redis")} for m in MODES},
        "config": {"messages": opts.messages, "runs": opts.runs, "batch": opts.batch,
                   "payload_bytes": opts.payload_bytes, "quick": opts.quick,
                   "read_count_baseline": 256, "delivery_config": "DeliveryConfig() defaults"},
        "machine": machine,
        "runs": runs,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    """A readable summary table of ``result``."""
    e, b, cpu = result["engine"], result["baseline"], result["cpu_us_per_msg"]
    cfg, machine = result["config"], result["machine"]
    lines = [
        f"### Throughput: {cfg['messages']:,} messages x {cfg['runs']} runs, "
        f"~{cfg['payload_bytes']} B payload, XADD batches of {cfg['batch']}",
        "",
        "| | engine | baseline | engine / baseline |",
        "|---|---:|---:|---:|",
        f"| msgs/s (median) | {e['median']:,.0f} | {b['median']:,.0f} | "
        f"{result['ratio']:.2f} |",
        f"| msgs/s (min - max) | {e['min']:,.0f} - {e['max']:,.0f} | "
        f"{b['min']:,.0f} - {b['max']:,.0f} | {result['ratio_per_run']['min']:.2f} - "
        f"{result['ratio_per_run']['max']:.2f} (paired runs) |",
    ]
    for side in ("consumer", "producer", "redis"):
        ce, cb = cpu["engine"][side], cpu["baseline"][side]
        lines.append(f"| {side} CPU us/msg (median) | {ce:.1f} | {cb:.1f} | {ce / cb:.2f} |")
    lines += ["", "| run | mode | msgs/s | seconds | consumer CPU us/msg | msgs/XREADGROUP |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['run']} | {r['mode']} | {r['msgs_per_s']:,.0f} | "
                     f"{r['seconds']:.2f} | {r['consumer_cpu_us_per_msg']:.1f} | "
                     f"{r['msgs_per_read']:.1f} |")
    lines += ["", f"{machine['cpu_count']} CPUs, Python {machine['python']}, "
              f"Redis {machine['redis_version']}, redis-py {machine['redis_py']}, "
              f"hiredis {machine['hiredis']}, load {machine['load_avg_start']}"]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
