"""Agents that benchmark node processes serve: ``coordinator node --agent benchmarks.agents:X``.

Their settings come from the environment of the node process (the CLI has no agent options):

- ``BENCH_DONE_KEY``: a Redis set; :func:`slow` adds each handled ``seq`` to it;
- ``BENCH_SLEEP_MS``: how long :func:`slow` works on one message;
- ``BENCH_LAT_FILE`` / ``BENCH_LAT_N``: :func:`latency` writes its publish->handler latencies
  (seconds, JSON) to this file once it has seen that many messages;
- ``BENCH_AGENTS``: how many agents ``b0 .. b{K-1}`` :func:`many` serves;
- ``BENCH_TRACING``: install the OpenTelemetry SDK in the node (:mod:`benchmarks.tracing`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from coordinator import Context, Message
from coordinator.agent import Registration

from .tracing import install_from_env

install_from_env()  # before the node builds its coordinator, as an application would


async def sink(message: Message, context: Context) -> Any:
    """Does nothing with a message; a ``{"probe": KEY}`` payload records whether LangGraph is
    imported in this process (``langgraph=0`` or ``=1`` added to the set KEY)."""
    payload = message.payload
    if isinstance(payload, dict) and "probe" in payload:
        loaded = int(any(name.split(".")[0] == "langgraph" for name in sys.modules))
        await context.coordinator.transport.set_add(payload["probe"], f"langgraph={loaded}")
    return None


async def echo(message: Message) -> Any:
    """Replies with the payload (request/reply round trips)."""
    return message.payload


_SLEEP_S = int(os.environ.get("BENCH_SLEEP_MS", "0")) / 1000
_DONE_KEY = os.environ.get("BENCH_DONE_KEY", "bench:done")


async def slow(message: Message, context: Context) -> None:
    """Works ``BENCH_SLEEP_MS`` on a message, then records its ``seq`` as done."""
    if _SLEEP_S:
        await anyio.sleep(_SLEEP_S)
    await context.coordinator.transport.set_add(_DONE_KEY, str(message.payload["seq"]))


_LAT_FILE = os.environ.get("BENCH_LAT_FILE")
_LAT_N = int(os.environ.get("BENCH_LAT_N", "0"))
_latencies: list[float] = []


async def latency(message: Message) -> None:
    """Notes ``now - payload["t"]``; writes all of them out at the N-th message."""
    _latencies.append(time.time() - message.payload["t"])
    if _LAT_FILE and len(_latencies) == _LAT_N:
        tmp = Path(_LAT_FILE + ".tmp")
        tmp.write_text(json.dumps(_latencies))
        tmp.replace(_LAT_FILE)


def many() -> list[Registration]:
    """``BENCH_AGENTS`` trivial agents ``b0 .. b{K-1}`` in one node."""
    return [Registration(f"b{i}", sink) for i in range(int(os.environ.get("BENCH_AGENTS", "1")))]
