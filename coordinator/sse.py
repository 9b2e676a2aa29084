"""A session's lifecycle events (and model tokens) as Server-Sent Events: ``coordinator serve``.

Needs the ``serve`` extra (Starlette, sse-starlette, uvicorn); the rest of the library never
imports this module.

``GET /sessions/{session_id}/events`` streams, oldest first, every retained lifecycle event of
the session and then new ones as they happen, each as an SSE message::

    event: lifecycle
    id: 1700000000000-3.1
    data: {"id": "...", "type": "agent:completed", "agent_id": "writer", ...}

With ``?tokens=1`` the session's streamed model tokens come interleaved (``event: token``,
``data: {"text": ..., "agent_id": ..., "run_id": ..., "stream_id": ...}``). The two live in
different Redis streams, so the SSE id then carries both cursors::

    id: <events position>|t:<tokens stream id>      e.g. 1700000000000-3.1|t:1700000000412-0

Each part is the id of the last item of that stream sent so far (``0-0`` before the first).
A client that reconnects with ``Last-Event-ID`` (EventSource does so by itself) resumes each
stream right after its cursor: no gap and no repeat. Tokens are capped per session (the
newest 10,000) and expire an hour after the last one, so a client away longer than that
misses the tokens trimmed meanwhile; events are durable within the retention.

Query parameters: ``tokens=1`` (include tokens), ``since`` (where to start without
``Last-Event-ID``: a stream id, ``0`` for everything retained (the default), epoch ms, an ISO
time, or ``now``). ``GET /healthz`` answers 200 when Redis answers, else 503. A comment line
is sent as keep-alive every ``ping_s`` seconds (15).
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import CoordinatorConfig
from .errors import ConfigError, CoordinatorError
from .events import after_id, is_position
from .keys import Keys
from .tailing import last_id
from .tokens import follow_session
from .transport import RedisTransport, StreamTransport

__all__ = ["create_app", "format_cursor", "parse_cursor", "run_server"]

log = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"^\d+-\d+$")
_TOKENS_PREFIX = "t:"


class Cursor(msgspec.Struct, frozen=True):
    """Where a client is in each stream: ``None`` means "not given"."""

    events: bytes | None
    tokens: bytes | None


def parse_cursor(last_event_id: str) -> Cursor:
    """Parse an SSE id this app sent (``<events id>`` or ``<events id>|t:<tokens id>``).

    :raises ConfigError: for anything else
    """
    events: bytes | None = None
    tokens: bytes | None = None
    for part in last_event_id.strip().split("|"):
        if part.startswith(_TOKENS_PREFIX) and _STREAM_ID.match(part[len(_TOKENS_PREFIX):]):
            tokens = part[len(_TOKENS_PREFIX):].encode()
        elif is_position(part) and events is None:
            events = part.encode()
        else:
            raise ConfigError(f"Last-Event-ID {last_event_id!r}: expected '<stream id>' or "
                              "'<stream id>|t:<stream id>'")
    return Cursor(events, tokens)


def format_cursor(events: bytes | str, tokens: bytes | str | None) -> str:
    """The SSE id for the cursors (``tokens`` None: events only)."""
    text = events.decode() if isinstance(events, bytes) else events
    if tokens is None:
        return text
    return f"{text}|{_TOKENS_PREFIX}{tokens.decode() if isinstance(tokens, bytes) else tokens}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def create_app(config: CoordinatorConfig | str | None = None, *,
               transport: StreamTransport | None = None, ping_s: float = 15,
               block_ms: int | None = None) -> Starlette:
    """The ASGI app.

    :param config: where Redis is and under which prefix (default: from ``KIKI_*``)
    :param transport: use this connected transport instead of connecting (not closed here)
    :param ping_s: seconds between keep-alive comments
    :param block_ms: how long one blocking read waits (default ``delivery.block_ms``)
    """
    if config is None:
        config = CoordinatorConfig.from_env()
    elif isinstance(config, str):
        config = CoordinatorConfig.from_url(config)
    settings = config
    keys = Keys(settings.redis.prefix)
    wait_ms = block_ms if block_ms is not None else settings.delivery.block_ms

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = transport is None
        app.state.transport = transport or await RedisTransport.connect(settings.redis)
        try:
            yield
        finally:
            if own:
                await app.state.transport.close()

    async def healthz(request: Request) -> Response:
        try:
            await request.app.state.transport.ping()
        except CoordinatorError as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    async def session_events(request: Request) -> Response:
        store: StreamTransport = request.app.state.transport
        session_id = request.path_params["session_id"]
        with_tokens = _truthy(request.query_params.get("tokens"))
        try:
            tokens_key = keys.tokens(session_id) if with_tokens else None
            since = request.query_params.get("since", "0")
            start = None if since.strip().lower() in ("now", "$") else after_id(since)
            header = request.headers.get("last-event-id") or \
                request.query_params.get("last_event_id")
            cursor = parse_cursor(header) if header else Cursor(None, None)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        events_from = cursor.events if cursor.events is not None else start
        tokens_from = cursor.tokens if cursor.tokens is not None else start
        # Fix "now" to ids, so every SSE id names both positions from the first message on.
        if events_from is None:
            events_from = await last_id(store, keys.events())
        if tokens_key is not None and tokens_from is None:
            tokens_from = await last_id(store, tokens_key)

        async def messages() -> AsyncIterator[ServerSentEvent]:
            events_at: bytes | str = events_from
            tokens_at: bytes | str | None = tokens_from if with_tokens else None
            async with follow_session(store, keys.events(), tokens_key, session_id,
                                      events_after=events_from, tokens_after=tokens_from,
                                      follow=True, block_ms=wait_ms) as items:
                async for stream, item in items:
                    if stream == "events":
                        events_at, name = item.stream_id, "lifecycle"
                    else:
                        tokens_at, name = item.stream_id, "token"
                    yield ServerSentEvent(msgspec.json.encode(item).decode(), event=name,
                                          id=format_cursor(events_at, tokens_at))

        return EventSourceResponse(messages(), ping=ping_s,
                                   headers={"Cache-Control": "no-store",
                                            "X-Accel-Buffering": "no"})

    return Starlette(routes=[Route("/healthz", healthz),
                             Route("/sessions/{session_id}/events", session_events)],
                     lifespan=lifespan)


async def run_server(config: CoordinatorConfig, host: str = "127.0.0.1", port: int = 8080,
                     **uvicorn_options: Any) -> None:
    """Serve :func:`create_app` with uvicorn until SIGINT/SIGTERM, then return (open streams
    are ended; a second SIGINT forces the exit)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # handled below, so a stop ends the command normally (exit code 0)

    options: dict[str, Any] = {"log_level": "info", "timeout_graceful_shutdown": 5,
                               "lifespan": "on", **uvicorn_options}
    server = Server(uvicorn.Config(create_app(config), host=host, port=port, **options))

    async def stop_on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                server.handle_exit(signum, None)  # also tells sse-starlette to end streams

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signals)
        await server.serve()
        tg.cancel_scope.cancel()
