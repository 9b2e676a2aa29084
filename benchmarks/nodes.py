"""Node processes (``python -m coordinator node``) and what the parent watches in Redis.

:class:`Nodes` starts nodes the way a user does, from the repository root so ``benchmarks.*``
and ``agents.*`` import, and stops or kills every one of them on every exit path. Completion
of a run is read from Redis itself (consumer group lag and pending), so it counts acks, not
handler calls, and works the same for every implementation measured.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import redis

from .harness import ROOT, ChildFailed


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGTERM when the benchmark process dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, kept across exec


class Nodes:
    """Owns node processes; all are gone when the ``with`` block is left."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str, *agents: str, env: dict[str, str] | None = None,
              extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start one node serving ``agents`` (``MODULE:ATTR[=ID]`` specs)."""
        cmd = [sys.executable, "-m", "coordinator", "--log-level", "WARNING", "node",
               "--redis-url", self.url, "--prefix", self.prefix, "--node-id", node_id,
               *extra]
        for agent in agents:
            cmd += ["--agent", agent]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        self.procs[node_id] = proc
        return proc

    def kill(self, node_id: str) -> None:
        """SIGKILL one node and reap it."""
        proc = self.procs[node_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def check(self) -> None:
        """:raises ChildFailed: if a node exited on its own"""
        for node_id, proc in self.procs.items():
            code = proc.poll()
            if code is not None and code != -signal.SIGKILL:
                err = proc.stderr.read().decode(errors="replace")[-800:] if proc.stderr else ""
                raise ChildFailed(f"node {node_id} exited with {code}: {err}")

    def close(self) -> None:
        """SIGTERM every running node, then SIGKILL what is left after 10 s."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()
        self.procs.clear()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def inbox(prefix: str, agent: str) -> str:
    """The stream key of an agent's inbox (see ``coordinator.keys.Keys.inbox``)."""
    return f"{prefix}:{{a:{agent}}}:stream"


def _groups(client: redis.Redis, streams: Sequence[str]) -> list[list[dict[str, Any]]]:
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_groups(client: redis.Redis, pairs: Sequence[tuple[str, str]], timeout_s: float = 30,
                nodes: Nodes | None = None) -> None:
    """Wait until every ``(stream, group)`` exists (its consumer is up).

    :raises ChildFailed: on timeout or when a node dies first
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _groups(client, [s for s, _ in pairs])
        if all(isinstance(rows, list) and any(_name(r["name"]) == g for r in rows)
               for rows, (_, g) in zip(found, pairs)):
            return
        if nodes is not None:
            nodes.check()
        time.sleep(0.02)
    raise ChildFailed(f"consumer groups {pairs[:3]}... not created in {timeout_s:.0f}s")


def acked(client: redis.Redis, pairs: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """(entries read, still pending) summed over ``(stream, group)`` pairs."""
    read = pending = 0
    for rows, (stream, group) in zip(_groups(client, [s for s, _ in pairs]), pairs):
        if not isinstance(rows, list):
            continue
        for row in rows:
            if _name(row["name"]) == group:
                entries_read = row.get("entries-read")  # Redis 7 and later
                read += (int(entries_read) if entries_read is not None
                         else _read_up_to(client, stream, row["last-delivered-id"]))
                pending += int(row["pending"])
    return read, pending


def _read_up_to(client: redis.Redis, stream: str, last_delivered: bytes | str) -> int:
    """Entries of ``stream`` up to the group's last delivered id (Redis 6.2 keeps no count):
    the length less what follows, counted up to 1,000 (the benchmark streams only grow)."""
    after = b"(" + (last_delivered if isinstance(last_delivered, bytes)
                    else last_delivered.encode())
    return int(client.xlen(stream)) - len(client.xrange(stream, min=after, count=1000))


def wait_acked(client: redis.Redis, pairs: Sequence[tuple[str, str]], total: int,
               timeout_s: float, nodes: Nodes | None = None) -> float:
    """Wait until ``total`` entries were read and none is pending; returns ``time.time()`` then.

    Polls slowly while far from done and every millisecond near the end.

    :raises ChildFailed: on timeout (with the counts reached)
    """
    deadline = time.monotonic() + timeout_s
    read = pending = 0
    while time.monotonic() < deadline:
        read, pending = acked(client, pairs)
        if read >= total and pending == 0:
            return time.time()
        if nodes is not None:
            nodes.check()
        time.sleep(0.001 if read >= total * 0.98 else 0.01)
    raise ChildFailed(f"only {read - pending} of {total} acked within {timeout_s:.0f}s")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def delete_prefix(client: redis.Redis, *patterns: str) -> None:
    """Delete every key matching the patterns."""
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
