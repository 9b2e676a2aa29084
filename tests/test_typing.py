"""The library type-checks under mypy strict (STYLE.md; settings in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[dev]')")
def test_mypy_strict_passes() -> None:
    # From the repository root, so mypy reads [tool.mypy] in pyproject.toml. A cold run takes
    # ~10 s; with .mypy_cache (git-ignored) well under one.
    result = subprocess.run([sys.executable, "-m", "mypy", "coordinator"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
