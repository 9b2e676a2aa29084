"""The benchmark suite's --quick run, as CI executes it: every section runs to the end on a
private redis-server and writes its JSON. Its numbers are not asserted (timing belongs to
the benchmarks, not to tests), only what would be a bug at any speed: messages lost in the
failover run, or a mode that measured nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"throughput", "latency", "reqrep", "failover", "scale", "memory"}


@pytest.mark.timeout(660)
def test_quick_benchmark_run_completes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == SECTIONS
    rows = sections["throughput"]["runs"]
    modes = {row["mode"] for row in rows}
    assert {"engine", "baseline", "node", "node-quiet", "node-traced"} <= modes
    assert all(row["msgs_per_s"] > 0 for row in rows)
    assert sections["failover"]["summary"]["lost"]["max"] == 0
    assert sections["reqrep"]["summary"]["round_trips_per_s"]["median"] > 0
    assert "| mode |" in done.stdout  # the readable tables too
