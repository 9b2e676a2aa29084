"""``coordinator demo``: a multi-agent run across three node processes, with a node killed
mid-way to show that its work finishes elsewhere and nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from .config import CoordinatorConfig, DeliveryConfig, mask_url, redis_url_from_addr
from .coordinator import MultiAgentCoordinator
from .embedded import EmbeddedRedis
from .errors import ConfigError
from . import codec
from .agent import Message
from .envelope import AgentEvent

NODES = 3
HEARTBEAT_TTL_MS = 2000
WORK_MS = 40


def repository_root() -> Path:
    """The checkout holding ``agents/`` (the reference agents are not installed)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "agents" / "counter.py").exists():
        raise ConfigError("the demo needs the reference agents in agents/ of a source "
                          "checkout (pip install -e .)")
    return root


class Tally:
    """The demo's own agent: counts reports of handled work, by work number and node."""

    def __init__(self) -> None:
        self.seen_reports: set[str] = set()
        self.handled: dict[int, list[str]] = {}
        self.done_at: dict[int, float] = {}

    async def __call__(self, message: Message) -> None:
        if message.id in self.seen_reports:
            return  # a redelivered report, not a second handling
        self.seen_reports.add(message.id)
        n, node = int(message.payload["n"]), str(message.payload["node"])
        self.handled.setdefault(n, []).append(node)
        self.done_at.setdefault(n, time.monotonic())


def _say(text: str) -> None:
    print(text, flush=True)


class NodeProcesses:
    """The demo's node processes. The Redis URL (it may hold a password) reaches them in the
    ``KIKI_REDIS_URL`` environment variable, never on a command line others can read."""

    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        self.url, self.prefix, self.logs = url, prefix, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str) -> None:
        cmd = [sys.executable, "-m", "coordinator", "node",
               "--prefix", self.prefix, "--node-id", node_id, "--concurrency", "8",
               "--heartbeat-ttl-ms", str(HEARTBEAT_TTL_MS),
               "--agent", "agents.counter:Counter", "--agent", "agents.echo:echo",
               "--agent", "agents.research:team"]
        log = open(self.logs / f"{node_id}.log", "wb")
        env = {**os.environ, "KIKI_REDIS_URL": self.url}
        self.procs[node_id] = subprocess.Popen(cmd, cwd=repository_root(), stdout=log,
                                               stderr=subprocess.STDOUT, env=env)

    def kill(self, node_id: str) -> None:
        self.procs[node_id].send_signal(signal.SIGKILL)
        self.procs[node_id].wait()

    def stop_all(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for node_id, proc in self.procs.items():
            try:
                codes[node_id] = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[node_id] = proc.wait()
        return codes


async def _wait_for_nodes(coordinator: MultiAgentCoordinator, count: int) -> None:
    with anyio.fail_after(30):
        while True:
            nodes = [n for n in await coordinator.nodes() if "counter" in n.agents]
            if len(nodes) >= count:
                return
            await anyio.sleep(0.1)


QUESTION = "How do consumer groups deliver messages and what happens when a node crashes?"


def _describe(event: AgentEvent) -> str:
    data = event.data or {}
    detail = {
        "agent:tool_call": lambda: f"{data.get('tool')}({_short(data.get('input'))})",
        "agent:tool_result": lambda: f"{data.get('tool')} -> {_short(data.get('output'))}",
        "agent:message": lambda: _short(data.get("content") or data.get("target")),
        "agent:completed": lambda: f"in {data.get('duration_ms', '?')} ms",
        "agent:failed": lambda: f"{data.get('error_type')}: {_short(data.get('error'))}",
    }.get(event.type, lambda: "")()
    return f"   {event.node_id or '-':<12} {event.agent_id or '-':<10} {event.type:<18} {detail}"


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _research(coordinator: MultiAgentCoordinator) -> None:
    """One question to the LangGraph team (planner -> researcher x N -> writer), then the
    lifecycle events it left on the events stream, from every node."""
    _say(f"\n-> asking the research team (planner, researcher, writer: LangGraph graphs with "
         f"offline models that make real tool calls):\n   {QUESTION}")
    report = await coordinator.request("planner", QUESTION, timeout=30, session_id="research")
    _say(f"<- {_short(report, 200)}")
    await anyio.sleep(0.5)  # events are published in the background, a few ms behind
    _say("   lifecycle events of session 'research' (as any host can read or stream them):")
    async for event in coordinator.events(session_id="research", since="0", follow=False):
        if event.type != "agent:started":
            _say(_describe(event))


async def _conversation(coordinator: MultiAgentCoordinator, tally: Tally, nodes: NodeProcesses,
                        messages: int) -> dict[str, Any]:
    victim = "demo-node-2"
    inbox = coordinator.keys.inbox("counter").stream
    _say(f"\n-> sending {messages} work messages to agent 'counter' (3 replicas, "
         f"{WORK_MS} ms of work each) and 3 requests to 'echo'")
    for n in range(messages):
        await coordinator.send("counter", {"n": n, "work_ms": WORK_MS, "report_to": "tally"},
                               session_id="demo")
    for i in range(3):
        reply = await coordinator.request("echo", {"question": i}, timeout=10)
        _say(f"   request {i} answered by {reply['node']}: {reply['echo']}")
    with anyio.fail_after(60):
        while len(tally.handled) < messages * 0.3:
            await anyio.sleep(0.01)
    nodes.kill(victim)
    killed_at = time.monotonic()
    # What the killed node held unacknowledged is exactly what must now finish elsewhere.
    orphans = await coordinator.transport.pending(inbox, "counter", 10_000, victim)
    numbers = []
    for entry in orphans:
        rows = await coordinator.transport.range(inbox, entry.id, entry.id, 1)
        if rows:
            numbers.append(int(codec.decode_payload(
                codec.decode_envelope(rows[0].fields).payload)["n"]))
    _say(f"\n!! SIGKILL {victim} after {len(tally.handled)} of {messages} messages; "
         f"it held {len(numbers)} unacknowledged messages")
    with anyio.fail_after(120):
        while len(tally.handled) < messages:
            await anyio.sleep(0.02)
    await anyio.sleep(0.3)  # let late duplicate reports arrive before counting
    recovered = [n for n in numbers if n in tally.done_at]
    finishers = sorted({tally.handled[n][-1] for n in recovered})
    recovery_s = max((tally.done_at[n] - killed_at for n in recovered), default=0.0)
    return {"sent": messages, "handled": len(tally.handled),
            "lost": messages - len(tally.handled),
            "duplicates": sum(len(v) - 1 for v in tally.handled.values()),
            "orphaned": len(numbers), "recovered": len(recovered), "finishers": finishers,
            "recovery_s": recovery_s, "victim": victim}


def _summary(result: dict[str, Any], per_node: dict[str, int]) -> None:
    _say("\n== summary ==")
    _say(f"messages sent        {result['sent']}")
    _say(f"handled              {result['handled']}")
    _say(f"lost                 {result['lost']}")
    _say(f"duplicates           {result['duplicates']}  (at-least-once: a message whose handler"
         " finished but was not yet acked when its node died runs again)")
    _say(f"orphaned by the kill {result['orphaned']}, all finished on "
         f"{', '.join(result['finishers']) or '-'}")
    _say(f"recovery time        {result['recovery_s']:.2f} s after SIGKILL "
         f"(heartbeat TTL {HEARTBEAT_TTL_MS / 1000:.0f} s)")
    _say("handled per node     " + ", ".join(f"{k}: {v}" for k, v in sorted(per_node.items())))


async def run_demo(redis_url: str | None, messages: int) -> int:
    """Run the demo; returns the exit code (non-zero if anything was lost)."""
    if redis_url:
        redis_url = redis_url_from_addr("--redis-url", redis_url)
    server = None if redis_url else EmbeddedRedis().start()
    url = redis_url or server.url  # type: ignore[union-attr]
    shown = mask_url(url)
    _say(f"== Kiki Coordinator demo ==\nredis: {'embedded ' + shown if server else shown}")
    prefix = "demo-" + uuid.uuid4().hex[:6]
    logs = Path(tempfile.mkdtemp(prefix="kiki-demo-"))
    nodes = NodeProcesses(url, prefix, logs)
    config = CoordinatorConfig.from_url(url, prefix=prefix, node_id="demo-driver",
                                        delivery=DeliveryConfig(heartbeat_ttl_ms=HEARTBEAT_TTL_MS,
                                                                block_ms=200, grace_ms=2000))
    tally = Tally()
    try:
        for i in range(1, NODES + 1):
            nodes.start(f"demo-node-{i}")
        async with MultiAgentCoordinator(config) as coordinator:
            coordinator.register("tally", tally)
            await _wait_for_nodes(coordinator, NODES)
            _say(f"started {NODES} node processes, each hosting agents counter, echo, "
                 "planner, researcher and writer "
                 f"(logs in {logs})")
            await _research(coordinator)
            result = await _conversation(coordinator, tally, nodes, messages)
        per_node: dict[str, int] = {}
        for handlers in tally.handled.values():
            for node in handlers:
                per_node[node] = per_node.get(node, 0) + 1
        _summary(result, per_node)
        return 0 if result["lost"] == 0 else 1
    finally:
        codes = nodes.stop_all()
        _say("nodes stopped: " + ", ".join(f"{k} exit {v}" for k, v in sorted(codes.items())))
        if server is not None:
            server.close()
        if os.environ.get("KIKI_DEMO_KEEP_LOGS") is None:
            import shutil

            shutil.rmtree(logs, ignore_errors=True)
