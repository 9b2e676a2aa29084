"""Shared bits of every section: percentiles, min-max cells, per-run summaries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import summary


def available(modes: tuple[str, ...]) -> tuple[str, ...]:
    """``modes`` without the peers whose package is not installed (the ``bench`` extra)."""
    import importlib.util

    missing = {m for m in modes for pkg in ("faststream", "taskiq") if m.startswith(pkg)
               and importlib.util.find_spec(pkg if pkg == "faststream" else "taskiq_redis")
               is None}
    if missing:
        print(f"skipping {', '.join(sorted(missing))}: pip install -e '.[bench]'", flush=True)
    return tuple(m for m in modes if m not in missing)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    return {"p50": percentile(values, 50) * 1e3, "p99": percentile(values, 99) * 1e3,
            "max": max(values, default=0.0) * 1e3, "count": len(values)}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves."""
    return summary(values) | {"runs": list(values)}


def cell(stat: dict[str, Any], fmt: str = ",.0f") -> str:
    """``median (min-max)``, or only the median for one run."""
    if stat["min"] == stat["max"]:
        return format(stat["median"], fmt)
    return (f"{format(stat['median'], fmt)} ({format(stat['min'], fmt)}-"
            f"{format(stat['max'], fmt)})")


def mark(ok: bool) -> str:
    """A target verdict."""
    return "met" if ok else "NOT met"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
