"""Tracing switched on for a benchmark process, the way an application would do it.

``BENCH_TRACING=RATIO`` (0 < RATIO <= 1) in a process's environment installs the SDK's
tracer provider as the global one (parent-based sampling of that share of new traces, the
SDK's default sampler at 1) with a ``BatchSpanProcessor`` feeding an exporter that drops
everything. So the measured cost is what the library and the SDK spend per message, never an
exporter's network I/O. Node processes do this when the benchmark agent module is imported,
producers when they start. Metrics stay on the API's no-op provider: they are not tracing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

ENV = "BENCH_TRACING"


def install_from_env() -> bool:
    """Install the providers if ``BENCH_TRACING`` asks for it; True when it did."""
    ratio = float(os.environ.get(ENV, "0") or 0)
    if ratio <= 0:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SpanExporter,
                                                SpanExportResult)
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(min(ratio, 1.0))))
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    return True
