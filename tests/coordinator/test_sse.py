"""The SSE app on a real uvicorn server and a real redis-server: a session's events arrive with
their stream ids as SSE ids; a client that disconnects and reconnects with Last-Event-ID gets
every event (and token, with ?tokens=1) exactly once; keep-alive pings; /healthz."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

pytest.importorskip("sse_starlette")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from coordinator.agent import Context, Message  # noqa: E402
from coordinator.config import CoordinatorConfig, DeliveryConfig  # noqa: E402
from coordinator.coordinator import MultiAgentCoordinator  # noqa: E402
from coordinator.sse import create_app, parse_cursor  # noqa: E402
from coordinator.tokens import stream_id_key  # noqa: E402

pytestmark = pytest.mark.anyio

SSE = tuple[str | None, str | None, dict[str, Any]]  # event name, id, data


def make_config(url: str, prefix: str) -> CoordinatorConfig:
    delivery = DeliveryConfig(heartbeat_ttl_ms=2000, block_ms=100, grace_ms=1000,
                              backoff_base_ms=5, backoff_max_ms=20, claim_interval_ms=100)
    return CoordinatorConfig.from_url(url, prefix=prefix, node_id="n1", delivery=delivery)


@asynccontextmanager
async def serving(config: CoordinatorConfig, **options: Any) -> AsyncIterator[str]:
    """The app under uvicorn on a free loopback port, in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, **options), log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


async def read_sse(client: httpx.AsyncClient, url: str, n: int,
                   last_event_id: str | None = None, comments: list[str] | None = None
                   ) -> list[SSE]:
    """Read ``n`` SSE messages, then disconnect."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    found: list[SSE] = []
    with anyio.fail_after(15):
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    if comments is not None:
                        comments.append(line)
                    continue
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
                    continue
                if "data" in fields:
                    found.append((fields.get("event"), fields.get("id"),
                                  json.loads(fields["data"])))
                fields = {}
                if len(found) >= n:
                    break
    return found


async def test_events_resume_after_disconnect_exactly_once(real_server: Any,
                                                           prefix: str) -> None:
    async def worker(message: Message) -> str:
        return f"done {message.payload}"

    config = make_config(real_server.url, prefix)
    async with MultiAgentCoordinator(config) as coordinator, \
            serving(config, block_ms=100) as base, httpx.AsyncClient(timeout=10) as client:
        coordinator.register("worker", worker)
        for i in range(6):
            await coordinator.request("worker", i, timeout=10, session_id="s1")
            await coordinator.request("worker", i, timeout=10, session_id="other")
        url = f"{base}/sessions/s1/events"
        first = await read_sse(client, url, 5)  # then the client goes away

        async def more() -> None:  # events keep coming while the client is away and back
            for i in range(6, 10):
                await coordinator.request("worker", i, timeout=10, session_id="s1")
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(more)
            second = await read_sse(client, url, 20 - len(first), last_event_id=first[-1][1])
        stored = [e async for e in coordinator.events(session_id="s1", since="0",
                                                      follow=False)]
    received = first + second
    assert len(stored) == 20
    assert [data["id"] for _, _, data in received] == [e.id for e in stored]  # no gap/repeat
    for (name, sse_id, data), event in zip(received, stored):
        assert name == "lifecycle" and data["session_id"] == "s1"
        assert sse_id == data["stream_id"] == event.stream_id  # its position in the stream
    ids = [sse_id for _, sse_id, _ in received]
    assert ids == sorted(ids, key=stream_id_key) and len(set(ids)) == len(ids)


async def test_tokens_resume_with_both_cursors(real_server: Any, prefix: str) -> None:
    async def talker(message: Message, context: Context) -> str:
        for i in range(10):
            context.emit_token(f"{message.payload}.{i} ")
            await anyio.sleep(0.002)
        return "ok"

    config = make_config(real_server.url, prefix)
    async with MultiAgentCoordinator(config) as coordinator, \
            serving(config, block_ms=100) as base, httpx.AsyncClient(timeout=10) as client:
        coordinator.register("talker", talker)
        await coordinator.request("talker", "a", timeout=10, session_id="s2")
        await coordinator.request("talker", "x", timeout=10, session_id="elsewhere")
        url = f"{base}/sessions/s2/events?tokens=1"
        first = await read_sse(client, url, 7)
        await coordinator.request("talker", "b", timeout=10, session_id="s2")
        second = await read_sse(client, url, 24 - len(first), last_event_id=first[-1][1])
        stored = [e async for e in coordinator.events(session_id="s2", since="0",
                                                      follow=False)]
    received = first + second
    for _, sse_id, _ in received:
        assert sse_id and re.fullmatch(r"\d+-\d+(\.\d+)?\|t:\d+-\d+", sse_id)
        parse_cursor(sse_id)
    events = [data for name, _, data in received if name == "lifecycle"]
    tokens = [data for name, _, data in received if name == "token"]
    assert [e["id"] for e in events] == [e.id for e in stored] and len(events) == 4
    assert [t["text"] for t in tokens] == [f"{p}.{i} " for p in "ab" for i in range(10)]
    assert len({t["stream_id"] for t in tokens}) == 20
    assert all(t["session_id"] == "s2" and t["agent_id"] == "talker" for t in tokens)
    # Each part of the SSE id is the last id sent of its stream.
    events_at, tokens_at = "0-0", "0-0"
    for name, sse_id, data in received:
        if name == "lifecycle":
            events_at = data["stream_id"]
        else:
            tokens_at = data["stream_id"]
        assert sse_id == f"{events_at}|t:{tokens_at}"


async def test_ping_healthz_and_bad_cursor(real_server: Any, prefix: str) -> None:
    config = make_config(real_server.url, prefix)
    async with MultiAgentCoordinator(config) as coordinator, \
            serving(config, ping_s=0.2, block_ms=100) as base, \
            httpx.AsyncClient(timeout=10) as client:
        health = await client.get(f"{base}/healthz")
        assert health.status_code == 200 and health.json() == {"ok": True}
        bad = await client.get(f"{base}/sessions/s3/events",
                               headers={"Last-Event-ID": "not-an-id"})
        assert bad.status_code == 400

        async def later() -> None:
            await anyio.sleep(0.7)
            coordinator.register("echo", echo)
            await coordinator.request("echo", 1, timeout=10, session_id="s3")

        async def echo(message: Message) -> Any:
            return message.payload

        comments: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            got = await read_sse(client, f"{base}/sessions/s3/events?since=now", 2,
                                 comments=comments)
    assert [data["type"] for _, _, data in got] == ["agent:started", "agent:completed"]
    assert len(comments) >= 2 and all(c.startswith(": ping") for c in comments)
