"""The LangGraph integration: lifecycle events from callbacks, a graph served as an agent, and
the reference research team answering across coordinators and node processes."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

from agents import research  # noqa: E402
from coordinator.agent import Context, Message  # noqa: E402
from coordinator.config import CoordinatorConfig, DeliveryConfig  # noqa: E402
from coordinator.coordinator import MultiAgentCoordinator  # noqa: E402
from coordinator.integrations.langgraph import (EventCallbackHandler,  # noqa: E402
                                                GraphAgent, to_wire)
from coordinator.producer import make_envelope  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
QUESTION = ("How do consumer groups deliver messages and what happens when a node crashes?")
HAS_EMIT = hasattr(Context, "emit")


class Recorder:
    """Stands in for a Context: records what is emitted."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.tokens: list[tuple[str, str | None]] = []
        self.lost = False

    def emit(self, type: str, data: dict[str, Any]) -> None:
        self.events.append((type, data))

    def emit_token(self, text: str, *, run_id: str | None = None) -> bool:
        self.tokens.append((text, run_id))
        return True

    def raise_if_lost(self) -> None:
        pass

    def of(self, type: str) -> list[dict[str, Any]]:
        return [d for t, d in self.events if t == type]


def message(payload: Any, **fields: Any) -> Message:
    return Message(make_envelope("agent", payload, **fields), payload, 1, "1-0")


# -- callback handler ----------------------------------------------------------------------
async def test_handler_emits_tool_call_result_and_message() -> None:
    recorder = Recorder()
    graph = research.build_researcher()
    state = await graph.ainvoke({"messages": [HumanMessage("what happens when a node crashes")]},
                                {"callbacks": [EventCallbackHandler(recorder)]})
    assert "XAUTOCLAIM" in state["answer"]
    kinds = [t for t, _ in recorder.events]
    assert kinds == ["agent:tool_call", "agent:tool_result", "agent:message"]
    call, result, final = (d for _, d in recorder.events)
    assert call["tool"] == "search"
    assert call["input"] == {"query": "what happens when a node crashes"}
    assert call["tool_call_id"] and call["tool_call_id"] == result["tool_call_id"]
    assert result["run_id"] == call["run_id"] and result["ok"] is True
    assert "XAUTOCLAIM" in result["output"]
    assert final["content"] == state["answer"] and final["role"] == "ai"
    for data in (call, result, final):
        assert data["parent_run_id"]  # a node of the graph run, so events correlate


async def test_handler_disabled_emits_nothing_and_tokens_on_request() -> None:
    recorder = Recorder()
    graph = research.build_researcher()
    await graph.ainvoke({"messages": [HumanMessage("streams")]},
                        {"callbacks": [EventCallbackHandler(recorder, enabled=False)]})
    assert recorder.events == []

    model = research.ScriptedChatModel(script=lambda _: AIMessage("one two three"),
                                       streaming=True)
    await model.ainvoke("hi", {"callbacks": [EventCallbackHandler(recorder, tokens=True)]})
    assert "".join(text for text, _ in recorder.tokens) == "one two three"
    assert {run_id for _, run_id in recorder.tokens} == {recorder.of("agent:message")[0]["run_id"]}
    assert [t for t, _ in recorder.events] == ["agent:message"]  # tokens are not events
    assert recorder.of("agent:message")[0]["content"] == "one two three"
    quiet = Recorder()
    await model.ainvoke("hi", {"callbacks": [EventCallbackHandler(quiet)]})
    assert quiet.tokens == [] and len(quiet.of("agent:message")) == 1


async def test_handler_reports_model_and_tool_failures() -> None:
    def broken(_: Any) -> AIMessage:
        raise RuntimeError("model down")

    recorder = Recorder()
    graph = research.build_researcher(research.ScriptedChatModel(script=broken))
    with pytest.raises(RuntimeError, match="model down"):
        await graph.ainvoke({"messages": [HumanMessage("x")]},
                            {"callbacks": [EventCallbackHandler(recorder)]})
    failed = recorder.of("agent:failed")
    assert [f["stage"] for f in failed] == ["model", "graph"]  # the graph run once, not per node
    assert all(f["error_type"] == "RuntimeError" and f["error"] == "model down" for f in failed)
    assert failed[1]["parent_run_id"] is None

    from langchain_core.tools import tool

    @tool
    def explode(query: str) -> str:
        """Always fails."""
        raise ValueError("no index")

    recorder = Recorder()
    with pytest.raises(ValueError):
        await explode.ainvoke({"query": "q"}, {"callbacks": [EventCallbackHandler(recorder)]})
    (result,) = recorder.of("agent:tool_result")
    assert result["ok"] is False and result["error"] == "no index"
    assert result["tool"] == "explode"


def test_to_wire_makes_messages_and_objects_msgpack_safe() -> None:
    from coordinator import codec

    value = {"messages": [HumanMessage("hi"),
                          AIMessage("", tool_calls=[{"name": "search", "args": {"q": 1},
                                                     "id": "c1"}]),
                          ToolMessage("found", tool_call_id="c1")],
             "id": uuid.UUID(int=1), "t": (1, 2.5, None), "obj": object()}
    wire = to_wire(value)
    assert wire["messages"][0] == {"type": "human", "content": "hi"}
    assert wire["messages"][1]["tool_calls"] == [{"name": "search", "args": {"q": 1},
                                                  "id": "c1"}]
    assert wire["messages"][2] == {"type": "tool", "content": "found", "tool_call_id": "c1"}
    assert wire["t"] == [1, 2.5, None] and wire["id"] == str(uuid.UUID(int=1))
    assert codec.decode_payload(codec.encode_payload(wire)) == wire
    assert to_wire("x" * 50, 10).startswith("x" * 10 + "...")


# -- GraphAgent ----------------------------------------------------------------------------
class Slow(TypedDict, total=False):
    seconds: float
    config_seen: dict[str, Any]


def slow_graph() -> Any:
    async def nap(state: Slow) -> dict[str, Any]:
        from langgraph.config import get_config

        config = get_config()
        await anyio.sleep(state.get("seconds", 0))
        return {"config_seen": {k: v for k, v in config["configurable"].items()
                                if k == "thread_id"}}

    graph = StateGraph(Slow)
    graph.add_node("nap", nap)
    graph.add_edge(START, "nap")
    graph.add_edge("nap", END)
    return graph.compile()


async def test_graph_agent_input_session_and_output() -> None:
    agent = GraphAgent("slow", slow_graph())
    reply = await agent.handle(message({"seconds": 0}, session_id="s-1"), Recorder())  # type: ignore[arg-type]
    assert reply == {"seconds": 0, "config_seen": {"thread_id": "s-1"}}
    assert agent.graph_input("hello") == {"messages": [HumanMessage("hello")]}

    researcher = research.researcher()
    recorder = Recorder()
    answer = await researcher.handle(message("what is a consumer group"), recorder)  # type: ignore[arg-type]
    assert "XREADGROUP" in answer
    assert [t for t, _ in recorder.events] == ["agent:tool_call", "agent:tool_result",
                                               "agent:message"]
    whole = await GraphAgent("r", research.build_researcher()).handle(
        message("streams"), Recorder())  # type: ignore[arg-type]
    assert [m["type"] for m in whole["messages"]] == ["human", "ai", "tool", "ai"]


async def test_graph_agent_respects_the_deadline() -> None:
    agent = GraphAgent("slow", slow_graph())
    deadline_ms = int((time.time() + 0.2) * 1000)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await agent.handle(message({"seconds": 5}, deadline_ms=deadline_ms), Recorder())  # type: ignore[arg-type]
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError):
        await agent.handle(message({"seconds": 0}, deadline_ms=deadline_ms - 1000),
                           Recorder())  # type: ignore[arg-type]


# -- the research team across coordinators ------------------------------------------------
def config(url: str, prefix: str, node_id: str) -> CoordinatorConfig:
    return CoordinatorConfig.from_url(
        url, prefix=prefix, node_id=node_id,
        delivery=DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=200, grace_ms=1000))


async def events_of(coordinator: MultiAgentCoordinator) -> list[Any]:
    found = []
    async for event in coordinator.events(since="0", follow=False):  # type: ignore[attr-defined]
        found.append(event)
    return found


def event_fields(event: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(type, agent id, data) of a lifecycle event, whatever its exact class."""
    data = getattr(event, "data", None)
    if not isinstance(data, dict):
        from coordinator import codec

        data = codec.decode_payload(event.payload) if hasattr(event, "payload") else {}
    agent = getattr(event, "agent_id", None) or getattr(event, "sender", None)
    return str(getattr(event, "type", "")), agent, data


async def team_events(coordinator: MultiAgentCoordinator, *, completed: bool = False
                      ) -> list[Any]:
    """The lifecycle events once the team's are all written (publishing is buffered)."""
    with anyio.fail_after(10):
        while True:
            events = await events_of(coordinator)
            try:
                check_team_events(events, completed=completed)
            except AssertionError:
                await anyio.sleep(0.1)
                continue
            return events


def check_team_events(events: list[Any], *, completed: bool = False) -> None:
    seen = {(t, a) for t, a, _ in map(event_fields, events)}
    assert ("agent:tool_call", "researcher") in seen
    assert ("agent:tool_result", "researcher") in seen
    assert ("agent:tool_call", "planner") in seen  # ask_researcher / ask_writer
    assert ("agent:message", "writer") in seen
    assert ("agent:message", "planner") in seen
    search_calls = [d for t, a, d in map(event_fields, events)
                    if t == "agent:tool_call" and d.get("tool") == "search"]
    assert len(search_calls) == 2
    if completed:
        done = {a for t, a, _ in map(event_fields, events) if t == "agent:completed"}
        assert {"researcher", "writer", "planner"} <= done


@pytest.mark.real_redis
async def test_research_team_across_three_coordinators(real_server: Any, prefix: str) -> None:
    url = real_server.url
    async with MultiAgentCoordinator(config(url, prefix, "n-planner")) as planner_node, \
            MultiAgentCoordinator(config(url, prefix, "n-researcher")) as researcher_node, \
            MultiAgentCoordinator(config(url, prefix, "n-writer")) as writer_node, \
            MultiAgentCoordinator(config(url, prefix, "n-client")) as client:
        planner_node.register(research.planner())
        researcher_node.register(research.researcher())
        writer_node.register(research.writer())
        report = await client.request("planner", QUESTION, timeout=20, session_id="sess-1")
        assert report.startswith("Report: " + QUESTION)
        assert "XREADGROUP" in report and "XAUTOCLAIM" in report
        assert "Based on 2 finding(s)." in report
        if HAS_EMIT:
            await team_events(client)


@pytest.mark.real_redis
@pytest.mark.slow
async def test_research_team_across_node_processes(real_server: Any, prefix: str,
                                                   tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []

    def start(node_id: str, agent: str) -> None:
        log = open(tmp_path / f"{node_id}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "coordinator", "node", "--redis-url", real_server.url,
             "--prefix", prefix, "--node-id", node_id, "--agent", agent],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    try:
        start("p-researcher", "agents.research:researcher")
        start("p-writer", "agents.research:writer")
        async with MultiAgentCoordinator(config(real_server.url, prefix, "p-planner")) as node:
            node.register(research.planner())
            with anyio.fail_after(30):
                while {"p-researcher", "p-writer"} - {n.node_id for n in await node.nodes()}:
                    for proc in procs:
                        assert proc.poll() is None, "\n".join(
                            p.read_text() for p in tmp_path.glob("*.log"))
                    await anyio.sleep(0.1)
            report = await node.request("planner", QUESTION, timeout=20, session_id="sess-2")
            assert "XREADGROUP" in report and "Based on 2 finding(s)." in report
            if HAS_EMIT:
                async with MultiAgentCoordinator(config(real_server.url, prefix,
                                                        "p-observer")) as observer:
                    events = await team_events(observer, completed=True)
                run_ids = {d["run_id"] for t, a, d in map(event_fields, events)
                           if a == "researcher" and t == "agent:tool_result"}
                assert len(run_ids) == 2  # one search per sub-question, each correlated
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
