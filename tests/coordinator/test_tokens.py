"""Token streaming across hosts: tokens a handler emits on one coordinator are followed live by
another, each session's stream is capped and expires, the LangGraph handler streams tokens
there (not as lifecycle events), and `coordinator events --tokens` interleaves them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from coordinator.agent import Context, Message
from coordinator.config import CoordinatorConfig, DeliveryConfig
from coordinator.coordinator import MultiAgentCoordinator
from coordinator.events import AgentEvent
from coordinator.keys import Keys
from coordinator.tokens import Token, TokenPublisher, make_token, read_tokens
from coordinator.transport import MemoryTransport

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
Factory = Callable[..., AbstractAsyncContextManager[MultiAgentCoordinator]]


def make_config(url: str, prefix: str, node_id: str) -> CoordinatorConfig:
    delivery = DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=100, grace_ms=1000,
                              backoff_base_ms=5, backoff_max_ms=20, claim_interval_ms=100)
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id=node_id, delivery=delivery)


@pytest.fixture(params=["real", "memory"])
def node(request: pytest.FixtureRequest, prefix: str) -> Factory:
    """Coordinators sharing one store (a real server, or one memory transport)."""
    memory = MemoryTransport() if request.param == "memory" else None
    url = "redis://unused" if memory else request.getfixturevalue("real_server").url

    @asynccontextmanager
    async def make(node_id: str) -> AsyncIterator[MultiAgentCoordinator]:
        async with MultiAgentCoordinator(make_config(url, prefix, node_id),
                                         transport=memory) as coordinator:
            yield coordinator

    return make


async def all_events(coordinator: MultiAgentCoordinator, session_id: str,
                     until: Callable[[list[AgentEvent]], bool]) -> list[AgentEvent]:
    found: list[AgentEvent] = []
    with anyio.fail_after(10):
        async for event in coordinator.events(since="0", session_id=session_id):
            found.append(event)
            if until(found):
                return found
    raise AssertionError("event stream ended")


async def test_tokens_emitted_on_one_node_are_followed_live_on_another(node: Factory) -> None:
    words = [f"w{i} " for i in range(50)]

    async def llm(message: Message, context: Context) -> str:
        for word in words:
            assert context.emit_token(word, run_id="run-1")
            await anyio.sleep(0)
        return "".join(words)

    async with node("reader") as reader, node("writer") as writer:
        writer.register("llm", llm)
        followed: list[Token] = []
        ready = anyio.Event()

        async def follow() -> None:
            with anyio.fail_after(10):
                ready.set()
                async for token in reader.tokens("s-live", since="0"):
                    followed.append(token)
                    if len(followed) == len(words):
                        return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await ready.wait()
            message_id = await writer.send("llm", "go", session_id="s-live")
        assert [t.text for t in followed] == words
        for token in followed:
            assert (token.session_id, token.agent_id, token.node_id, token.message_id,
                    token.run_id) == ("s-live", "llm", "writer", message_id, "run-1")
        ids = [t.stream_id for t in followed]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        # Resuming after a token's stream id gives exactly the rest.
        rest = [t.text async for t in reader.tokens("s-live", since=ids[9], follow=False)]
        assert rest == words[10:]
        assert writer.token_publisher.published == len(words)
        # Tokens never enter the durable events stream.
        events = await all_events(reader, "s-live",
                                  lambda es: any(e.type == "agent:completed" for e in es))
        assert [e.type for e in events] == ["agent:started", "agent:completed"]


async def test_token_stream_is_capped_and_renewed_with_a_ttl(transport: Any, keys: Keys) -> None:
    publisher = TokenPublisher(keys.tokens, maxlen=100, ttl_ms=60_000)
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run, transport)
        for i in range(1000):
            assert publisher.publish_nowait(make_token(f"{i}", "s-cap"))
            if i % 50 == 0:
                await anyio.sleep(0.001)  # several batches, as a model streams
        await publisher.close()
    assert publisher.published == 1000 and publisher.dropped == 0
    key = keys.tokens("s-cap")
    length = await transport.length(key)
    assert 100 <= length <= 250  # MAXLEN ~ trims whole nodes (100 entries each by default)
    texts = [t.text async for t in read_tokens(transport, key, after=b"0-0", follow=False)]
    assert texts == [str(i) for i in range(1000 - length, 1000)]  # the newest survive
    client = getattr(transport, "client", None)  # the memory transport: see the next test
    if client is not None:
        assert 0 < await client.pttl(key) <= 60_000


async def test_token_stream_expires_and_full_buffer_drops() -> None:
    now = [1_700_000_000.0]
    transport = MemoryTransport(clock=lambda: now[0])
    keys = Keys("tk")
    publisher = TokenPublisher(keys.tokens, capacity=10, ttl_ms=3_600_000)
    for i in range(25):
        publisher.publish_nowait(make_token(str(i), "s-old"))
    assert (publisher.buffered, publisher.dropped) == (10, 15)
    assert not publisher.publish_nowait(make_token("x", "bad{session}"))  # no key for it
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run, transport)
        await publisher.close()
    assert await transport.length(keys.tokens("s-old")) == 10
    now[0] += 3_600.5  # an abandoned session's tokens vanish
    assert await transport.length(keys.tokens("s-old")) == 0


async def test_langgraph_handler_streams_tokens_not_events(node: Factory) -> None:
    pytest.importorskip("langgraph")
    from langchain_core.messages import AIMessage

    from agents import research
    from coordinator.integrations.langgraph import EventCallbackHandler

    model = research.ScriptedChatModel(script=lambda _: AIMessage("one two three"),
                                       streaming=True)

    async def talker(message: Message, context: Context) -> str:
        reply = await model.ainvoke(message.payload, {
            "callbacks": [EventCallbackHandler(context, tokens=True)]})
        return str(reply.content)

    async with node("n1") as coordinator:
        coordinator.register("talker", talker)
        assert await coordinator.request("talker", "hi", timeout=10,
                                         session_id="s-lg") == "one two three"
        text = ""
        with anyio.fail_after(10):
            async for token in coordinator.tokens("s-lg", since="0"):
                text += token.text
                assert token.agent_id == "talker" and token.run_id
                if text == "one two three":
                    break
        events = await all_events(coordinator, "s-lg",
                                  lambda es: any(e.type == "agent:completed" for e in es))
    types = [e.type for e in events]
    assert "agent:message" in types and "agent:token" not in types
    assert types == ["agent:started", "agent:message", "agent:completed"]


def run_cli(url: str, prefix: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "coordinator", "events", "--redis-url", url,
                           "--prefix", prefix, *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


async def test_cli_events_with_tokens_interleaves(real_server: Any, prefix: str) -> None:
    async def speaker(message: Message, context: Context) -> str:
        # The first token usually shares the started event's millisecond and the last the
        # completed event's: they still show in the order the handler made them.
        for word in ("alpha ", "beta ", "gamma"):
            context.emit_token(word)
            if word != "gamma":
                await anyio.sleep(0.01)
        return "ok"

    config = make_config(real_server.url, prefix, "n1")
    async with MultiAgentCoordinator(config) as coordinator:
        coordinator.register("speaker", speaker)
        await coordinator.request("speaker", "go", timeout=10, session_id="s-cli")
        await coordinator.request("speaker", "go", timeout=10, session_id="other")
    lines = await anyio.to_thread.run_sync(
        lambda: run_cli(real_server.url, prefix, "--tokens", "--session", "s-cli", "--json"))
    items = [json.loads(line) for line in lines]
    assert [(i["stream"], i.get("type") or i.get("text")) for i in items] == [
        ("events", "agent:started"), ("tokens", "alpha "), ("tokens", "beta "),
        ("tokens", "gamma"), ("events", "agent:completed")]
    assert all(i["session_id"] == "s-cli" for i in items)

    text = await anyio.to_thread.run_sync(
        lambda: run_cli(real_server.url, prefix, "--tokens", "--session", "s-cli"))
    assert len(text) == 3  # started, the tokens inline on one line, then completed
    assert "agent:started" in text[0] and text[1] == "alpha beta gamma"
    assert "agent:completed" in text[2]
