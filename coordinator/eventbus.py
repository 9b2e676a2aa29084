"""The seed's event bus API (``publish``/``subscribe``/``start_listener``/``close``) on Redis
Streams topics, built on :class:`MultiAgentCoordinator`'s broadcast and topic subscriptions.

A durable subscriber is a consumer group on the topic, named after the subscriber: it gets
every event at least once, and one that was down gets what it missed when it comes back (a new
subscriber starts from the oldest retained event). Processes subscribing under the same name
share the work. An ephemeral subscriber (``durable=False``) tails the topic from the moment it
starts, at most once, and leaves nothing behind.

::

    bus = get_eventbus(config)
    bus.subscribe("orders", on_order)
    await bus.start_listener()
    await bus.publish("orders", {"id": 1})
    ...
    await bus.close()

``start_listener`` and ``close`` must run in the same task (or use ``async with bus``).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from . import codec
from .agent import Message
from .config import CoordinatorConfig
from .coordinator import MultiAgentCoordinator
from .errors import CodecError, CoordinatorError, TransportError
from .keys import Keys, check_name
from .transport import MemoryTransport, RedisTransport, StreamTransport

__all__ = ["EventBus", "EventHandler", "get_eventbus"]

log = logging.getLogger(__name__)

EventHandler = Callable[[Any], Awaitable[None] | None]
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-/@]")


class EventBus:
    """Topic publish/subscribe with durable (consumer group) or ephemeral (tail) subscribers.

    :param config: a :class:`CoordinatorConfig` or a Redis URL (``provider: memory`` keeps
        everything in this process)
    :param transport: an already connected transport to share (tests, one memory store)
    """

    def __init__(self, config: CoordinatorConfig | str | None = None, *,
                 transport: StreamTransport | None = None) -> None:
        if config is None:
            config = CoordinatorConfig.from_env()
        elif isinstance(config, str):
            config = CoordinatorConfig.from_url(config)
        self.config = config
        self._transport = transport
        self._owns_transport = transport is None
        self._coordinator: MultiAgentCoordinator | None = None
        self._keys = Keys(config.redis.prefix)
        self._durable: list[tuple[str, Callable[[Message], Awaitable[None]], str]] = []
        self._tails: list[tuple[str, EventHandler]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._listening = False

    @property
    def coordinator(self) -> MultiAgentCoordinator:
        """The coordinator underneath.

        :raises CoordinatorError: before the first publish or ``start_listener``
        """
        if self._coordinator is None:
            raise CoordinatorError("the event bus is not connected yet")
        return self._coordinator

    async def _connect(self) -> MultiAgentCoordinator:
        if self._coordinator is None:
            if self._transport is None:
                if self.config.provider == "memory":
                    self._transport = MemoryTransport()
                else:
                    self._transport = await RedisTransport.connect(self.config.redis)
            coordinator = MultiAgentCoordinator(self.config, transport=self._transport)
            for topic, deliver, name in self._durable:
                coordinator.subscribe(topic, deliver, agent_id=name)
            self._coordinator = coordinator
        return self._coordinator

    async def publish(self, topic: str, event: Any) -> str:
        """Append ``event`` (any msgpack-able value or msgspec Struct) to ``topic``.

        :returns: the event's message id
        :raises CodecError: if the event cannot be encoded
        """
        if not self.config.enabled:
            return ""  # enabled: false turns the bus into a no-op, as in the seed
        coordinator = await self._connect()
        return await coordinator.broadcast(topic, event)

    def subscribe(self, topic: str, handler: EventHandler, *, durable: bool = True,
                  name: str | None = None) -> None:
        """Call ``handler(event)`` (sync or async) for each event published to ``topic``.

        :param durable: a consumer group named ``name``: at least once, survives downtime
            (raise to have the event retried); else a tail from now on, at most once
        :param name: the subscriber name (default: the handler's module and qualified name)
        """
        self._keys.topic(topic)  # validates the name
        if not durable:
            self._tails.append((topic, handler))
            if self._tg is not None:
                self._tg.start_soon(self._tail, topic, handler)
            return

        async def deliver(message: Message) -> None:
            await _call(handler, message.payload)

        subscriber = check_name("subscriber name", name or _subscriber_name(handler))
        if self._coordinator is None:
            self._durable.append((topic, deliver, subscriber))
        else:
            self._coordinator.subscribe(topic, deliver, agent_id=subscriber)

    async def start_listener(self) -> None:
        """Connect and start delivering to the subscribers (returns once they run)."""
        if self._listening or not self.config.enabled:
            return
        coordinator = await self._connect()
        await coordinator.__aenter__()
        try:
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            for topic, handler in self._tails:
                await self._tg.start(self._tail, topic, handler)
        except BaseException:
            await coordinator.__aexit__(None, None, None)
            raise
        self._listening = True

    async def close(self) -> None:
        """Stop the subscribers (in-flight handlers finish first) and disconnect."""
        try:
            if self._listening:
                self._listening = False
                assert self._tg is not None
                self._tg.cancel_scope.cancel()
                await self._tg.__aexit__(None, None, None)
                self._tg = None
                await self.coordinator.__aexit__(None, None, None)
        finally:
            if self._owns_transport and self._transport is not None:
                await self._transport.close()
                self._transport = None

    async def __aenter__(self) -> EventBus:
        await self.start_listener()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _tail(self, topic: str, handler: EventHandler, *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        transport = (await self._connect()).transport
        stream = self._keys.topic(topic).stream
        last = await transport.range(stream, b"-", b"+", count=1, reverse=True)
        after = last[0].id if last else b"0-0"  # XREAD from "$", kept between reads
        task_status.started()
        while True:
            try:
                entries = await transport.read(stream, after, 100,
                                               self.config.delivery.block_ms)
            except TransportError as exc:
                log.warning("tail of %s failed: %s", topic, exc)
                await anyio.sleep(0.5)
                continue
            for entry in entries:
                after = entry.id
                try:
                    event = codec.decode_payload(codec.decode_envelope(entry.fields).payload)
                    await _call(handler, event)
                except CodecError as exc:
                    log.warning("skipping entry %s of %s: %s", entry.id.decode(), topic, exc)
                except Exception:  # at most once: a failing ephemeral handler loses the event
                    log.exception("ephemeral subscriber of %s failed", topic)


async def _call(handler: EventHandler, event: Any) -> None:
    result = handler(event)
    if inspect.isawaitable(result):
        await result


def _subscriber_name(handler: EventHandler) -> str:
    module = getattr(handler, "__module__", None) or "handler"
    qualname = getattr(handler, "__qualname__", None) or type(handler).__name__
    return _UNSAFE.sub("_", f"{module}.{qualname}")[-200:]


def get_eventbus(config: CoordinatorConfig | str | None = None, *,
                 transport: StreamTransport | None = None) -> EventBus:
    """A new :class:`EventBus` for ``config`` (a factory: every call builds its own bus; with
    ``enabled: false`` it publishes and delivers nothing).

    :raises ConfigError: for an invalid or unsupported configuration
    """
    return EventBus(config, transport=transport)
