"""What every benchmark shares: child processes that always die, the payload, machine facts.

Children are ``python -m benchmarks.workers ROLE ...`` processes. Each writes one JSON object
per line on stdout (``{"event": "ready"}``, ``{"event": "done", ...}``); the parent waits for
those lines with a timeout. A child dies with its parent (``PR_SET_PDEATHSIG`` on Linux) and
after its own deadline, and :class:`Children` terminates whatever is still running on every
exit path of the parent.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child exited, timed out or said something unexpected."""


class Child:
    """One worker process and the JSON lines it writes."""

    def __init__(self, name: str, args: Sequence[str],
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", *args], cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """Wait for the line whose ``event`` is ``event``; lines that are not JSON are skipped.

        :raises ChildFailed: if the child exits first or the timeout passes
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{self.name}: no {event!r} within {timeout_s:.0f}s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                code = self.process.wait()
                raise ChildFailed(f"{self.name} exited with {code} before {event!r}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(message, dict) and message.get("event") == event:
                return message

    def finish(self, timeout_s: float = 15.0) -> None:
        """Wait for a normal exit.

        :raises ChildFailed: on a non-zero exit code or a timeout
        """
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"{self.name} did not exit within {timeout_s:.0f}s") from None
        if code:
            raise ChildFailed(f"{self.name} exited with {code}")

    def close(self) -> None:
        """Terminate (then kill) the process if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Children:
    """Owns every child started inside it; all are gone when the ``with`` block is left."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """Start ``python -m benchmarks.workers *args`` (``env`` added to ours)."""
        child = Child(name, args, env)
        self._children.append(child)
        return child

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for child in reversed(self._children):
            child.close()
        self._children.clear()


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies (Linux), so no orphan keeps running."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def terminate_as_exit() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks (and :class:`Children`) run."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def emit(event: str, **fields: Any) -> None:
    """In a child: tell the parent something, as one JSON line."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    return time.process_time()


# -- payload --------------------------------------------------------------------------------
def filler_for(payload_bytes: int) -> str:
    """The text field that makes :func:`make_payload` encode to about ``payload_bytes``."""
    import msgspec

    base = len(msgspec.msgpack.encode(make_payload(0, "")))
    # +2: a str longer than 31 bytes carries a 2-byte length header in msgpack.
    return "x" * max(0, payload_bytes - base - 2)


def make_payload(seq: int, filler: str) -> dict[str, Any]:
    """A typical small agent message: a few ids, a number, a short list, some text."""
    return {"seq": seq, "session": "s-0001", "user": "user-42", "role": "planner",
            "score": 0.5, "tags": ["alpha", "beta"], "text": filler}


# -- facts and numbers ----------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used so far (from INFO cpu)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command the Redis server has served so far (from INFO commandstats)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()
            if isinstance(row, dict) and name != "cmdstat_info"}


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands served between two :func:`redis_calls` snapshots (the ones that changed)."""
    diff = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: n for name, n in sorted(diff.items()) if n}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(client: redis.Redis) -> dict[str, Any]:
    """Where the numbers come from: CPU, Python, Redis and library versions, load."""
    server = client.info("server")
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "redis_version": server.get("redis_version"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "msgspec": _version("msgspec"),
        "anyio": _version("anyio"),
        "git_commit": _git_commit(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
