"""Throughput with tracing on vs off: ``python tests/telemetry_overhead.py [--messages N]``.

One coordinator sends N messages from 100 concurrent senders to an agent it serves (no-op
handler) on a private redis-server; messages per second from the first send to the last
handled, and process CPU per message. "on": SDK tracer provider (sampling ``--sample``,
default all) with a BatchSpanProcessor to an exporter that drops everything, plus an SDK meter
provider; "off": the API's no-op globals. Runs interleave.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.coordinator import MultiAgentCoordinator  # noqa: E402
from coordinator.embedded import EmbeddedRedis  # noqa: E402


def providers(ratio: float) -> dict[str, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    return {"tracer_provider": tracer_provider,
            "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])}


async def run(url: str, messages: int, traced: bool, ratio: float) -> tuple[float, float]:
    config = CoordinatorConfig.from_url(url, prefix="o" + uuid.uuid4().hex[:8], node_id="bench")
    kwargs = providers(ratio) if traced else {}
    done = anyio.Event()
    handled = 0

    async def sink(message: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == messages:
            done.set()

    async def sender(start: int, step: int) -> None:
        for i in range(start, messages, step):
            await node.send("sink", i)

    async with MultiAgentCoordinator(config, **kwargs) as node:
        node.register("sink", sink)
        await anyio.sleep(0.2)
        started, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            for k in range(100):
                tg.start_soon(sender, k, 100)
        await done.wait()
        elapsed = time.perf_counter() - started
        cpu_us = (time.process_time() - cpu) / messages * 1e6
    if traced:
        kwargs["tracer_provider"].shutdown()
        kwargs["meter_provider"].shutdown()
    return messages / elapsed, cpu_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sample", type=float, default=1.0, help="traced share of messages")
    opts = parser.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    with EmbeddedRedis() as server:
        for _ in range(opts.runs):
            for traced in (False, True):
                rate, cpu_us = anyio.run(run, server.url, opts.messages, traced,
                                           opts.sample)
                results[traced].append(rate)
                cpu[traced].append(cpu_us)
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"tracing off: {off:,.0f} msg/s (runs {[round(r) for r in results[False]]})")
    print(f"tracing on:  {on:,.0f} msg/s (runs {[round(r) for r in results[True]]})")
    print(f"on/off: {on / off:.2f}; process CPU per message: off "
          f"{statistics.median(cpu[False]):.0f} us, on {statistics.median(cpu[True]):.0f} us")


if __name__ == "__main__":
    main()
