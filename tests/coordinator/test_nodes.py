"""Real node processes launched through the ``coordinator`` CLI, on the suite's redis-server:
failover after SIGKILL, graceful SIGTERM, request/reply and broadcast across processes, and the
operator commands against a live deployment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from coordinator import codec
from coordinator.agent import Message
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.errors import RemoteError, RequestTimeout

pytestmark = [pytest.mark.anyio, pytest.mark.real_redis]

ROOT = Path(__file__).resolve().parents[2]
TTL_MS = 1000
AGENTS = "tests.processes.node_agents"


class Nodes:
    """Node processes started with ``python -m coordinator node`` from the repository root."""

    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        self.url, self.prefix, self.logs = url, prefix, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str, *agents: str, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "coordinator", "node", "--redis-url", self.url,
               "--prefix", self.prefix, "--node-id", node_id,
               "--heartbeat-ttl-ms", str(TTL_MS), *extra]
        for agent in agents:
            cmd += ["--agent", agent]
        log = open(self.logs / f"{node_id}.log", "wb")
        self.procs[node_id] = subprocess.Popen(cmd, cwd=ROOT, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               env={**os.environ, **(env or {})})
        log.close()

    def log(self, node_id: str) -> str:
        return (self.logs / f"{node_id}.log").read_text(errors="replace")

    def signal(self, node_id: str, signum: int) -> None:
        self.procs[node_id].send_signal(signum)

    def wait(self, node_id: str, timeout: float = 15) -> int:
        return self.procs[node_id].wait(timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Tally:
    """The test's own agent: every node agent reports each handling here."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.reports: list[dict[str, Any]] = []
        self.handled: dict[Any, list[str]] = {}
        self.done_at: dict[Any, float] = {}

    async def __call__(self, message: Message) -> None:
        if message.id in self.seen:
            return  # a redelivered report, not a second handling
        self.seen.add(message.id)
        report = dict(message.payload)
        self.reports.append(report)
        key = report.get("n")
        self.handled.setdefault(key, []).append(str(report["node"]))
        self.done_at.setdefault(key, time.monotonic())

    def duplicates(self) -> int:
        return sum(len(v) - 1 for v in self.handled.values())


@pytest.fixture
def nodes(real_server: Any, prefix: str, tmp_path: Path) -> Iterator[Nodes]:
    found = Nodes(real_server.url, prefix, tmp_path)
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
async def driver(real_server: Any, prefix: str) -> AsyncIterator[tuple[MultiAgentCoordinator,
                                                                      Tally]]:
    """The test process's coordinator, hosting the ``tally`` agent."""
    config = CoordinatorConfig.from_url(
        real_server.url, prefix=prefix, node_id="driver",
        delivery=DeliveryConfig(heartbeat_ttl_ms=TTL_MS, block_ms=200, grace_ms=1000))
    tally = Tally()
    async with MultiAgentCoordinator(config) as coordinator:
        coordinator.register("tally", tally)
        yield coordinator, tally


async def wait_for_nodes(coordinator: MultiAgentCoordinator, nodes: Nodes, *node_ids: str,
                         timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while True:
            live = {n.node_id for n in await coordinator.nodes()}
            if set(node_ids) <= live:
                return
            for node_id in node_ids:
                code = nodes.procs[node_id].poll()
                assert code is None, f"{node_id} exited {code}:\n{nodes.log(node_id)}"
            await anyio.sleep(0.05)


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def cli(url: str | None, prefix: str | None, *args: str, timeout: float = 30
        ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "coordinator", *args]
    if url is not None:
        cmd += ["--redis-url", url]
    if prefix is not None:
        cmd += ["--prefix", prefix]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


async def acli(url: str | None, prefix: str | None, *args: str, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
    """``cli`` off the event loop, so coordinators of the test keep their heartbeats."""
    return await anyio.to_thread.run_sync(lambda: cli(url, prefix, *args, timeout=timeout))


async def numbers_of(coordinator: MultiAgentCoordinator, stream: str,
                     ids: list[bytes]) -> list[int]:
    found = []
    for entry_id in ids:
        rows = await coordinator.transport.range(stream, entry_id, entry_id, 1)
        if rows:
            envelope = codec.decode_envelope(rows[0].fields)
            found.append(int(codec.decode_payload(envelope.payload)["n"]))
    return found


# -- a. failover after SIGKILL ------------------------------------------------------------------
@pytest.mark.slow
async def test_sigkill_of_a_node_loses_nothing_and_peers_finish_its_work_fast(
        nodes: Nodes, driver: tuple[MultiAgentCoordinator, Tally]) -> None:
    coordinator, tally = driver
    total, victim = 10_000, "kill-2"
    for i in (1, 2, 3):
        # Dead nodes are looked for every claim interval: with the default (1 s) the worst
        # case is TTL + 1 s + the work itself, so poll a little faster than that.
        nodes.start(f"kill-{i}", "agents.counter:Counter", extra=("--concurrency", "32"),
                    env={"KIKI_CLAIM_INTERVAL_MS": "500"})
    await wait_for_nodes(coordinator, nodes, "kill-1", "kill-2", "kill-3")
    inbox = coordinator.keys.inbox("counter").stream
    sent = 0

    async def sender() -> None:
        nonlocal sent
        for n in range(total):
            await coordinator.send("counter", {"n": n, "work_ms": 20, "report_to": "tally"})
            sent += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await wait_until(lambda: len(tally.handled) >= 1500, 60, "1500 handled")
        nodes.signal(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # What the killed node held unacknowledged is what must now finish on a peer.
        orphans = await coordinator.transport.pending(inbox, "counter", 10_000, victim)
        sent_at_kill = sent
    assert nodes.wait(victim) == -signal.SIGKILL
    orphaned = await numbers_of(coordinator, inbox, [e.id for e in orphans])
    await wait_until(lambda: len(tally.handled) >= total, 60, "every message handled")
    await anyio.sleep(0.3)  # late duplicate reports
    lost = [n for n in range(total) if n not in tally.handled]
    recovery_s = max((tally.done_at[n] - killed_at for n in orphaned), default=0.0)
    finishers = {tally.handled[n][-1] for n in orphaned}
    print(f"\nSIGKILL after {sent_at_kill} sent: orphaned {len(orphaned)}, recovered in "
          f"{recovery_s:.2f}s by {sorted(finishers)}, duplicates {tally.duplicates()}, "
          f"lost {len(lost)}")
    assert not lost
    assert sent_at_kill < total, "the node should die while messages are still being sent"
    assert orphaned, "the killed node held no in-flight work"
    assert finishers <= {"kill-1", "kill-3"}
    assert recovery_s <= TTL_MS / 1000 + 1.0
    assert tally.duplicates() <= len(orphaned)


# -- b. graceful stop ---------------------------------------------------------------------------
@pytest.mark.slow
async def test_sigterm_hands_back_unfinished_work_to_a_peer_at_once(
        nodes: Nodes, driver: tuple[MultiAgentCoordinator, Tally]) -> None:
    coordinator, tally = driver
    victim, peer = "term-1", "term-2"
    common = ("--claim-idle-ms", "60000")
    nodes.start(victim, f"{AGENTS}:recorder",
                extra=(*common, "--grace-ms", "700", "--concurrency", "4"))
    await wait_for_nodes(coordinator, nodes, victim)
    inbox = coordinator.keys.inbox("recorder").stream
    total = 24

    async def send(n: int) -> None:  # short work finishes within the grace period, long not
        await coordinator.send("recorder", {"n": n, "work_ms": 200 if n % 2 else 1500,
                                            "report_to": "tally"})

    async def victim_pending() -> list[Any]:
        return await coordinator.transport.pending(inbox, "recorder", 100, victim)

    # The stopping node first takes two long and two short messages (its four slots)...
    for n in range(4):
        await send(n)
    with anyio.fail_after(10):
        while len(await victim_pending()) < 4:
            await anyio.sleep(0.01)
    # ...then a peer joins and more work arrives.
    nodes.start(peer, f"{AGENTS}:recorder", extra=(*common, "--concurrency", "16"))
    await wait_for_nodes(coordinator, nodes, peer)
    for n in range(4, total):
        await send(n)
    held_ids = [e.id for e in await victim_pending()]
    held = await numbers_of(coordinator, inbox, held_ids)
    nodes.signal(victim, signal.SIGTERM)
    termed_at = time.monotonic()
    with anyio.fail_after(10):  # every held entry is acked or owned by the peer
        while any(e.consumer != peer for e in await coordinator.transport.pending(
                inbox, "recorder", 100) if e.id in held_ids):
            await anyio.sleep(0.01)
    taken_s = time.monotonic() - termed_at
    assert await anyio.to_thread.run_sync(nodes.wait, victim) == 0, nodes.log(victim)
    await wait_until(lambda: all(n in tally.handled for n in held), 6,
                     f"the stopped node's entries {held} to finish")
    done_s = max(tally.done_at[n] - termed_at for n in held)
    await wait_until(lambda: len(tally.handled) >= total, 10, "every message handled")
    handed_back = [n for n in held if tally.handled[n][-1] == peer]
    print(f"\nSIGTERM: held {sorted(held)}, handed back and finished on the peer "
          f"{sorted(handed_back)}, taken {taken_s:.2f}s and all done {done_s:.2f}s after "
          "SIGTERM")
    # Far below claim_idle_ms (60 s): handed back, not left to the idle claimer.
    assert taken_s < 0.7 + 1.0 + 1.0  # grace + one claim interval + slack
    assert done_s < 0.7 + 1.0 + 1.5 + 1.0
    assert any(n % 2 == 0 for n in handed_back), "long work should have been handed back"
    consumers = await coordinator.transport.consumers(inbox, "recorder")
    assert victim not in {c.name for c in consumers}
    assert "stopping" in nodes.log(victim) and "stopped" in nodes.log(victim)


# -- c. request/reply across processes ----------------------------------------------------------
@pytest.mark.slow
async def test_request_reply_across_processes(
        real_server: Any, prefix: str, nodes: Nodes,
        driver: tuple[MultiAgentCoordinator, Tally]) -> None:
    coordinator, tally = driver
    nodes.start("rr-1", f"{AGENTS}:recorder", f"{AGENTS}:failing",
                extra=("--max-deliveries", "2"))
    await wait_for_nodes(coordinator, nodes, "rr-1")

    done = await acli(real_server.url, prefix, "send", "recorder", '{"n": 7}', "--wait",
                      "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"reply": {"got": 7, "node": "rr-1"}}

    assert await coordinator.request("recorder", {"n": 8}, timeout=5) == {"got": 8,
                                                                           "node": "rr-1"}
    with pytest.raises(RequestTimeout):
        await coordinator.request("nobody", {"n": 9}, timeout=0.3)
    with pytest.raises(RemoteError) as raised:
        await coordinator.request("failing", {"n": 10}, timeout=10)
    assert "ValueError" in str(raised.value) and "cannot handle" in str(raised.value)
    with anyio.fail_after(5):  # the error reply goes out just before the dead-lettering
        while len(await coordinator.dead_letters("failing").list()) != 1:
            await anyio.sleep(0.02)

    timed_out = await acli(real_server.url, prefix, "send", "nobody", "{}", "--wait", "--timeout",
                    "0.3")
    assert timed_out.returncode != 0
    assert len(timed_out.stderr.strip().splitlines()) == 1, timed_out.stderr
    assert "no reply" in timed_out.stderr and "Traceback" not in timed_out.stderr

    # A request whose deadline passed before any replica started is never started.
    with pytest.raises(RequestTimeout):
        await coordinator.request("late", {"n": 1, "report_to": "tally"}, timeout=0.2)
    await coordinator.send("late", {"n": 2, "report_to": "tally"})
    nodes.start("rr-2", f"{AGENTS}:recorder=late")
    await wait_until(lambda: 2 in tally.handled, 20, "the message after the expired one")
    await anyio.sleep(0.2)
    assert 1 not in tally.handled
    late = coordinator.keys.inbox("late").stream
    assert await coordinator.transport.pending(late, "late", 10) == []


# -- d. broadcast across processes --------------------------------------------------------------
@pytest.mark.slow
async def test_broadcast_reaches_every_subscriber_once_and_a_late_node_catches_up(
        nodes: Nodes, driver: tuple[MultiAgentCoordinator, Tally]) -> None:
    coordinator, tally = driver
    nodes.start("bc-a", f"{AGENTS}:news_a")
    nodes.start("bc-b", f"{AGENTS}:news_b")
    await wait_for_nodes(coordinator, nodes, "bc-a", "bc-b")
    assert {n.node_id: n.topics for n in await coordinator.nodes()
            if n.node_id.startswith("bc-")} == {"bc-a": {"news": ["sub-a"]},
                                                  "bc-b": {"news": ["sub-b"]}}

    def got(agent: str) -> list[Any]:
        return sorted(r["n"] for r in tally.reports if r["agent"] == agent)

    for n in range(20):
        await coordinator.broadcast("news", {"n": n, "report_to": "tally"})
    await wait_until(lambda: len(tally.reports) >= 40, 20, "40 reports")
    await anyio.sleep(0.2)
    assert got("sub-a") == got("sub-b") == list(range(20))  # once per agent

    nodes.signal("bc-b", signal.SIGTERM)
    assert await anyio.to_thread.run_sync(nodes.wait, "bc-b") == 0
    for n in range(20, 30):  # sub-b is down: its group keeps these for it
        await coordinator.broadcast("news", {"n": n, "report_to": "tally"})
    await wait_until(lambda: got("sub-a") == list(range(30)), 20, "sub-a to get 30")
    assert got("sub-b") == list(range(20))
    nodes.start("bc-b2", f"{AGENTS}:news_b")
    await wait_until(lambda: got("sub-b") == list(range(30)), 20, "sub-b to catch up")
    await anyio.sleep(0.2)
    assert got("sub-a") == got("sub-b") == list(range(30))
    assert {r["node"] for r in tally.reports if r["agent"] == "sub-b" and r["n"] >= 20} == {
        "bc-b2"}


# -- e. operator commands -----------------------------------------------------------------------
@pytest.mark.slow
async def test_cli_status_agents_and_dlq_against_a_live_deployment(
        real_server: Any, prefix: str, nodes: Nodes,
        driver: tuple[MultiAgentCoordinator, Tally]) -> None:
    coordinator, tally = driver
    url = real_server.url
    nodes.start("ops-1", "agents.echo:echo", f"{AGENTS}:failing",
                extra=("--max-deliveries", "1"))
    await wait_for_nodes(coordinator, nodes, "ops-1")
    for n in range(3):
        await coordinator.send("failing", {"n": n})
    with anyio.fail_after(10):
        while await coordinator.dead_letters("failing").count() < 3:
            await anyio.sleep(0.02)
    await coordinator.send("parked", {"n": 1})  # no node hosts it: waits in its inbox

    async def run_json(*args: str) -> Any:
        done = await acli(url, prefix, *args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    status = await run_json("status")
    assert {n["node_id"] for n in status["nodes"]} == {"driver", "ops-1"}
    ops = next(n for n in status["nodes"] if n["node_id"] == "ops-1")
    assert ops["agents"] == ["echo", "failing"]
    by_agent = {a["agent_id"]: a for a in status["agents"]}
    assert by_agent["failing"]["dead_letters"] == 3 and by_agent["failing"]["pending"] == 0
    assert by_agent["parked"]["backlog"] == 1 and by_agent["parked"]["nodes"] == []
    assert by_agent["echo"]["nodes"] == ["ops-1"]

    agents = {a["agent_id"]: a for a in await run_json("agents")}
    assert {"echo", "failing", "parked", "tally"} <= set(agents)
    assert agents["tally"]["nodes"] == ["driver"]
    assert agents["failing"]["dead_letters"] == 3

    letters = await run_json("dlq", "list", "failing")
    assert len(letters) == 3
    assert {letter["error_type"] for letter in letters} == {"ValueError"}
    shown = await run_json("dlq", "show", "failing", letters[0]["id"])
    assert shown["payload"] == {"n": 0} and shown["id"] == letters[0]["id"]
    # Redriven, it fails again (max deliveries 1) and lands back in the dead letters.
    assert await run_json("dlq", "redrive", "failing", letters[0]["id"]) == {"redriven": 1,
                                                                       "skipped": []}
    with anyio.fail_after(10):
        while len(ids := [d.id for d in await coordinator.dead_letters("failing").list()]
                  ) != 3 or letters[0]["id"] in ids:
            await anyio.sleep(0.02)
    assert await run_json("dlq", "purge", "failing", letters[1]["id"]) == {"purged": 1}
    refused = await acli(url, prefix, "dlq", "purge", "failing")
    assert refused.returncode != 0 and "--all" in refused.stderr
    assert await run_json("dlq", "purge", "failing", "--all") == {"purged": 2}
    assert await run_json("dlq", "list", "failing") == []


def test_cli_errors_are_one_line_without_traceback(real_server: Any, prefix: str) -> None:
    cases = {
        "bad agent": cli(real_server.url, prefix, "node", "--agent", "no_such_module:x"),
        "bad attr": cli(real_server.url, prefix, "node", "--agent", "agents.echo:nope"),
        "unreachable": cli("redis://127.0.0.1:1/0", prefix, "status"),
        "malformed url": cli("not-a-url", prefix, "agents"),
        "bad json": cli(real_server.url, prefix, "send", "echo", "{oops"),
    }
    for name, done in cases.items():
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0, name
        assert len(lines) == 1 and "Traceback" not in done.stderr, (name, done.stderr)
        assert lines[0].startswith("coordinator "), (name, lines)


@pytest.mark.parametrize("command", [
    [], ["node"], ["demo"], ["status"], ["agents"], ["send"], ["dlq"], ["events"], ["config"]])
def test_every_subcommand_has_help(command: list[str]) -> None:
    from coordinator.cli import build_parser

    known = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if command and command[0] not in known:
        pytest.skip(f"no {command[0]!r} command yet")
    done = cli(None, None, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: coordinator" in done.stdout
