"""MultiAgentCoordinator: the facade. One per node process; an async context manager owning one
task group with the heartbeat, the reply router, retention and one consumer per agent inbox and
topic subscription."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import msgspec

from . import codec
from .agent import Agent, HandlerFunc, Message, Registration, registration_for
from .archive import archives, sync_event
from .config import CoordinatorConfig, default_node_id
from .consumer import GroupConsumer
from .deadletter import DeadLetters
from .delivery import StreamSpec
from .envelope import MULTI_AGENT_SYNC, Envelope, NodeInfo
from .errors import BacklogFull, CoordinatorError, RemoteError, RequestTimeout, TransportError
from .events import (EVENTS_TOPIC, AgentEvent, EventEntry, EventPublisher, after_id,
                     event_envelope, events_of, matches, read_events)
from .keys import Keys
from .producer import envelopes_like, make_envelope, new_message_id
from .registry import Heartbeat, Registry, now_ms
from .replies import ReplyRouter
from .retention import Retention
from .serving import AgentServer
from .status import AgentStatus, agent_statuses, stream_backlog
from .tokens import Token, TokenPublisher, read_tokens
from .telemetry import MeterProvider, Telemetry, TracerProvider
from .transport import RedisTransport, StreamTransport

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class MultiAgentCoordinator:
    """Sends messages between agents on any node and serves the agents registered here.

    ``send`` to an agent that no live node hosts is not an error: the message waits durably in
    that agent's inbox until a replica starts (``agents()`` shows the backlog).

    :param config: a :class:`CoordinatorConfig`, or a Redis URL
    :param transport: an already connected transport (tests, the in-memory provider)
    :param tracer_provider: where spans go (default: OpenTelemetry's global provider)
    :param meter_provider: where metrics go (default: OpenTelemetry's global provider)
    :param event_publisher: publishes this node's lifecycle events (default: built from the
        config, a 10,000-event buffer that drops when full)
    :param token_publisher: streams handlers' model tokens to per-session capped streams
        (``Context.emit_token``; default: a 10,000-token buffer that drops when full)
    """

    def __init__(self, config: CoordinatorConfig | str | None = None, *,
                 transport: StreamTransport | None = None,
                 tracer_provider: TracerProvider | None = None,
                 meter_provider: MeterProvider | None = None,
                 event_publisher: EventPublisher | None = None,
                 token_publisher: TokenPublisher | None = None) -> None:
        if config is None:
            config = CoordinatorConfig.from_env()
        elif isinstance(config, str):
            config = CoordinatorConfig.from_url(config)
        self.config = config
        self.keys = Keys(config.redis.prefix)
        self.node_id = config.node_id or default_node_id()
        self.telemetry = Telemetry(tracer_provider, meter_provider, node_id=self.node_id)
        self.telemetry.watch(self)
        self.heartbeats = 0
        self._transport = transport
        self._owns_transport = transport is None
        self._registrations: list[Registration] = []
        self._consumers: list[GroupConsumer] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._replies: ReplyRouter | None = None
        self._known_inboxes: set[str] = set()
        self._started_ms = now_ms()
        self._stopped = anyio.Event()
        self._running = 0
        self._beating = False
        self._consumers_done = anyio.Event()
        self._consumers_done.set()
        self.event_publisher = event_publisher or EventPublisher(
            self.keys.events(), enabled=config.enabled and config.publish_events,
            timeout_ms=config.publish_timeout_ms)
        self.token_publisher = token_publisher or TokenPublisher(
            self.keys.tokens, enabled=config.enabled, timeout_ms=config.publish_timeout_ms)
        #: Publish a ``multiagent:sync`` record of every message sent (for the archive and
        #: replay); on when the configuration archives to filesystem or postgres.
        self.record_messages = archives(config.persistence) and self.event_publisher.enabled

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def transport(self) -> StreamTransport:
        """The connected transport.

        :raises CoordinatorError: before the coordinator was entered
        """
        if self._transport is None:
            raise CoordinatorError("use `async with MultiAgentCoordinator(...)` first")
        return self._transport

    async def __aenter__(self) -> MultiAgentCoordinator:
        if self._transport is None:
            self._transport = await RedisTransport.connect(self.config.redis)
        self.registry = Registry(self._transport, self.keys, self.config.delivery.heartbeat_ttl_ms)
        self._exit_stack_tg = anyio.create_task_group()
        self._tg = await self._exit_stack_tg.__aenter__()
        try:
            await self._tg.start(self.event_publisher.run, self._transport)
            await self._tg.start(self.token_publisher.run, self._transport)
            self._replies = ReplyRouter(self._transport, self.keys.replies(self.node_id))
            await self._tg.start(self._replies.run)
            for registration in self._registrations:
                await self._start(registration)
            retention = Retention(self._transport, self._served_streams,
                                  self.config.delivery.retention_ms,
                                  self.config.delivery.retention_interval_ms)
            self._tg.start_soon(retention.run)
            self._tg.start_soon(self.telemetry.sample_forever, self._transport)
            if self.config.events_retention_ms and self.event_publisher.enabled:
                self._tg.start_soon(Retention(
                    self._transport, lambda: [self.keys.events()],
                    self.config.events_retention_ms, self.config.delivery.retention_interval_ms,
                    by_age_alone=True).run)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._exit_stack_tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        assert self._tg is not None
        try:
            # Shielded: an outer cancellation or a crashed part must not skip the hand-back.
            with anyio.CancelScope(shield=True):
                await self._stop_gracefully()
            self._tg.cancel_scope.cancel()
        finally:
            try:
                # Always exits the task group, so a crashed part's error surfaces as itself.
                return await self._exit_stack_tg.__aexit__(exc_type, exc, tb)
            finally:
                self._stopped.set()
                if self._owns_transport and self._transport is not None:
                    with anyio.CancelScope(shield=True):
                        await self._transport.close()
                    self._transport = None

    async def _stop_gracefully(self) -> None:
        for consumer in self._consumers:
            consumer.stop()
        # Consumers drain within the grace period, ack, and hand back the rest...
        with anyio.move_on_after(self.config.delivery.grace_ms / 1000 + 6):
            await self._consumers_done.wait()
        await self.event_publisher.close()  # what the handlers reported, written (bounded)
        await self.token_publisher.close()
        # ...then the node disappears, so peers take whatever was handed back at once.
        with anyio.move_on_after(3):
            try:
                await self.registry.deregister(self.node_id)
            except CoordinatorError as error:
                log.warning("could not deregister: %s", error)

    def _node_info(self) -> NodeInfo:
        self.heartbeats += 1  # called once per beat
        topics: dict[str, list[str]] = {}
        for r in self._registrations:
            if r.topic:
                topics.setdefault(r.topic, []).append(r.agent_id)
        return NodeInfo(node_id=self.node_id, host=socket.gethostname(), pid=os.getpid(),
                        agents=sorted({r.agent_id for r in self._registrations if not r.topic}),
                        topics=topics, started_ms=self._started_ms, beat_ms=now_ms(),
                        concurrency=self.config.delivery.concurrency, version=VERSION)

    def _served_streams(self) -> list[str]:
        return [c.spec.keys.stream for c in self._consumers]

    # -- serving ----------------------------------------------------------------------------
    def register(self, agent: Agent | HandlerFunc | str, handler: HandlerFunc | None = None, *,
                 payload_type: type | None = None, concurrency: int | None = None) -> None:
        """Serve an agent on this node: ``register("id", func)``, ``register(agent_object)``
        or ``register(async_func)`` (the function's name is the agent id).

        ``func(message)`` or ``func(message, context)``; its return value is the reply when the
        message is a request. Raise :class:`Retry` or :class:`Reject` to steer delivery.
        """
        self.add(registration_for(agent, handler, payload_type=payload_type,
                                   concurrency=concurrency))

    def subscribe(self, topic: str, handler: HandlerFunc, *, agent_id: str | None = None,
                  payload_type: type | None = None) -> None:
        """Receive every message broadcast to ``topic`` (once per agent, not per replica)."""
        name = agent_id or handler.__name__
        self.keys.topic(topic)  # validates the name
        self.add(Registration(name, handler, topic=topic, payload_type=payload_type))

    def add(self, registration: Registration) -> None:
        """Serve a prepared :class:`Registration` (what ``register`` builds)."""
        self._registrations.append(registration)
        if self._tg is not None:
            self._tg.start_soon(self._start, registration)

    async def _start(self, registration: Registration) -> None:
        assert self._tg is not None
        if not self._beating:
            # Only a coordinator that serves agents is a node; a pure client (``coordinator
            # send``, an application that only sends) never shows up in the registry.
            self._beating = True
            await self._tg.start(Heartbeat(self.registry, self._node_info,
                                           self.config.delivery.heartbeat_interval_ms).run)
        delivery = self.config.delivery
        if registration.concurrency:
            delivery = msgspec.structs.replace(delivery, concurrency=registration.concurrency)
        if registration.topic == EVENTS_TOPIC:
            keys = self.keys.event_group(registration.agent_id)
        elif registration.topic:
            keys = self.keys.subscription(registration.topic, registration.agent_id)
            await self.transport.set_add(self.keys.topics, registration.topic)
        else:
            keys = self.keys.inbox(registration.agent_id)
            await self.transport.set_add(self.keys.agents, registration.agent_id)
        server = AgentServer(self, registration, delivery.max_deliveries)
        consumer = GroupConsumer(self.transport,
                                 StreamSpec(keys, registration.agent_id, self.node_id),
                                 server, delivery, alive=self.registry.alive,
                                 **({"decode": event_envelope}
                                    if registration.topic == EVENTS_TOPIC else {}))
        self._consumers.append(consumer)
        await self._tg.start(self._run_consumer, consumer)
        try:
            await self.registry.beat(self._node_info())  # visible as a host of it right away
        except TransportError as exc:  # the heartbeat task keeps trying
            log.warning("heartbeat after registering %s failed: %s", registration.agent_id, exc)

    async def _run_consumer(self, consumer: GroupConsumer, *,
                            task_status: anyio.abc.TaskStatus[None]) -> None:
        self._running += 1
        self._consumers_done = anyio.Event()
        try:
            await consumer.run(task_status=task_status)
        finally:
            self._running -= 1
            if not self._running:
                self._consumers_done.set()

    @property
    def consumers(self) -> Sequence[GroupConsumer]:
        """The running consumers of this node (one per inbox or subscription)."""
        return tuple(self._consumers)

    async def serve_forever(self) -> None:
        """Wait until the coordinator has stopped."""
        await self._stopped.wait()

    # -- sending ----------------------------------------------------------------------------
    async def send(self, agent_id: str, payload: Any, *, session_id: str | None = None,
                   user_id: str | None = None, headers: dict[str, str] | None = None,
                   type: str = MULTI_AGENT_SYNC, deadline_s: float | None = None,
                   message_id: str | None = None, **internal: Any) -> str:
        """Deliver ``payload`` at least once to one live replica of ``agent_id``.

        :param deadline_s: the message is not started after this many seconds
        :param message_id: set it to make a resend recognisable by the dedup window
        :returns: the message id
        :raises BacklogFull: when the inbox is over ``delivery.inbox_limit``
        """
        with self.telemetry.producer("send", agent_id, session_id=session_id,
                                     sender=internal.get("_sender")) as span:
            envelope = self._envelope(agent_id, payload, session_id=session_id,
                                      user_id=user_id, headers=headers, type=type,
                                      deadline_s=deadline_s, message_id=message_id, **internal)
            await self._deliver(agent_id, [envelope], span)
        return envelope.id

    async def send_many(self, agent_id: str, payloads: Iterable[Any], *,
                        session_id: str | None = None, user_id: str | None = None,
                        headers: dict[str, str] | None = None, type: str = MULTI_AGENT_SYNC,
                        deadline_s: float | None = None) -> list[str]:
        """Deliver many payloads to ``agent_id`` in one round trip; each is a separate
        message with the same delivery guarantee as :meth:`send`. Returns their ids in order.

        :raises BacklogFull: when the inbox is over ``delivery.inbox_limit``
        """
        with self.telemetry.producer("send", agent_id, session_id=session_id) as span:
            template = self._envelope(agent_id, None, session_id=session_id, user_id=user_id,
                                      headers=headers, type=type, deadline_s=deadline_s,
                                      message_id=None)
            envelopes = envelopes_like(template, payloads)
            if envelopes:
                await self._deliver(agent_id, envelopes, span)
        return [envelope.id for envelope in envelopes]

    async def _deliver(self, agent_id: str, envelopes: list[Envelope], span: Any) -> None:
        """Append envelopes to an agent's inbox (one round trip), after admission checks."""
        stream = self.keys.inbox(agent_id).stream
        if agent_id not in self._known_inboxes:  # listed for status even before it runs
            await self.transport.set_add(self.keys.agents, agent_id)
            self._known_inboxes.add(agent_id)
        limit = self.config.delivery.inbox_limit
        if limit:
            backlog = await self.backlog(stream)
            if backlog >= limit:
                raise BacklogFull(f"inbox of {agent_id!r} holds {backlog} unhandled messages "
                                  f"(limit {limit}); retry later")
        if len(envelopes) == 1:  # concurrent single sends still share round trips
            await self.transport.add(stream, codec.encode(envelopes[0]))
        else:
            await self.transport.add_many(stream, [codec.encode(e) for e in envelopes])
        self._sent(span, envelopes, "send")

    def _sent(self, span: Any, envelopes: list[Envelope], via: str) -> None:
        """Count what was sent; record it for the archive when it keeps messages."""
        self.telemetry.sent(span, envelopes, "publish" if via == "broadcast" else "send")
        if self.record_messages:
            for envelope in envelopes:
                event = sync_event(envelope, via, self.node_id)
                if event is not None:
                    self.event_publisher.publish_nowait(event)

    def _envelope(self, target: str, payload: Any, *, deadline_s: float | None,
                  message_id: str | None, _sender: str | None = None,
                  _parent: Envelope | None = None, **fields: Any) -> Envelope:
        if deadline_s is not None:
            fields["deadline_ms"] = now_ms() + int(deadline_s * 1000)
        elif _parent is not None and _parent.deadline_ms is not None:
            fields["deadline_ms"] = _parent.deadline_ms  # work done for a request inherits it
        fields["headers"] = fields.get("headers") or {}
        if "traceparent" not in fields:
            fields.update(self.telemetry.trace_fields())  # the current PRODUCER span
        return make_envelope(target, payload, id=message_id, sender=_sender,
                             sender_node=self.node_id, **fields)

    async def backlog(self, stream: str) -> int:
        """Entries of a stream not yet acknowledged by its slowest group."""
        return await stream_backlog(self.transport, stream)

    async def request(self, agent_id: str, payload: Any, *, timeout: float,
                      session_id: str | None = None, **kwargs: Any) -> Any:
        """Send a request and wait for the reply (the handler's return value).

        The deadline travels with the message: a replica does not start it once passed.
        :raises RequestTimeout: no reply within ``timeout`` seconds
        :raises RemoteError: the handler raised for the last time (it was dead-lettered)
        """
        assert self._replies is not None, "use `async with` first"
        correlation_id = new_message_id()
        waiter = self._replies.expect(correlation_id)
        try:
            message_id = await self.send(
                agent_id, payload, session_id=session_id, deadline_s=timeout,
                correlation_id=correlation_id, reply_to=self._replies.stream, **kwargs)
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        finally:
            self._replies.forget(correlation_id)
        reply = waiter.reply
        if reply is None:
            raise RequestTimeout(f"no reply from {agent_id!r} within {timeout}s "
                                 f"(message {message_id})")
        if not reply.ok:
            raise RemoteError(reply.error_type or "Error", reply.error or "")
        return codec.decode_payload(reply.payload)

    def is_reply_stream(self, key: str) -> bool:
        """Whether ``key`` is a reply stream of this deployment (replies go nowhere else)."""
        return key.startswith(f"{self.keys.prefix}:{{n:") and key.endswith("}:replies")

    async def broadcast(self, topic: str, payload: Any, *, session_id: str | None = None,
                        **kwargs: Any) -> str:
        """Publish ``payload`` to every agent subscribed to ``topic``; returns the message id."""
        with self.telemetry.producer("publish", topic, session_id=session_id,
                                     sender=kwargs.get("_sender")) as span:
            envelope = self._envelope(topic, payload, session_id=session_id,
                                      deadline_s=kwargs.pop("deadline_s", None),
                                      message_id=kwargs.pop("message_id", None), **kwargs)
            await self.transport.add(self.keys.topic(topic).stream, codec.encode(envelope))
            self._sent(span, [envelope], "broadcast")
        return envelope.id

    # -- lifecycle events -------------------------------------------------------------------
    async def events(self, *, types: Collection[str] | None = None, agent_id: str | None = None,
                     session_id: str | None = None, since: str | int | None = None,
                     follow: bool = True) -> AsyncIterator[AgentEvent]:
        """Lifecycle events of every node, oldest first; filters apply on this side.

        :param since: a stream id (exclusive; ``event.stream_id`` resumes), ``"0"`` for all
            that is retained, epoch ms or an ISO time; None: only events from now on
        :param follow: keep waiting for new events; else stop at the current end
        :raises ConfigError: for a ``since`` that is none of those
        """
        wanted = None if types is None else {str(t) for t in types}
        async for event in read_events(self.transport, self.keys.events(),
                                       after=after_id(since), follow=follow,
                                       block_ms=self.config.delivery.block_ms):
            if matches(event, wanted, agent_id, session_id):
                yield event

    async def tokens(self, session_id: str, *, since: str | int | None = None,
                     follow: bool = True) -> AsyncIterator[Token]:
        """The model tokens streamed in a session (``Context.emit_token``) by any node.

        The stream is capped and expires an hour after its last token: tokens are for live
        views, not for the record.

        :param since: a stream id (exclusive; ``token.stream_id`` resumes), ``"0"`` for all
            that is retained, epoch ms or an ISO time; None: only tokens from now on
        :param follow: keep waiting for new tokens; else stop at the current end
        """
        async for token in read_tokens(self.transport, self.keys.tokens(session_id),
                                       after=after_id(since), follow=follow,
                                       block_ms=self.config.delivery.block_ms):
            yield token

    def subscribe_events(self, group: str, handler: Callable[[AgentEvent], Awaitable[None]],
                         *, types: Collection[str] | None = None) -> None:
        """Consume lifecycle events as the durable group ``group``: at least once, shared by
        every node subscribing with that name, catching up on what was missed while none ran
        (from the oldest retained event for a new group). Raise to have an event retried: its
        whole stream entry is delivered again, with the events of its batch before it."""
        wanted = None if types is None else {str(t) for t in types}

        async def deliver(message: Message) -> None:
            for event in events_of(message):
                if wanted is None or event.type in wanted:
                    await handler(event)

        self.add(Registration(group, deliver, topic=EVENTS_TOPIC, payload_type=EventEntry))

    # -- inspection -------------------------------------------------------------------------
    async def agents(self) -> list[AgentStatus]:
        """Every known agent with its live nodes, backlog, pending and dead letters."""
        return await agent_statuses(self.transport, self.keys, await self.registry.nodes())

    async def nodes(self) -> list[NodeInfo]:
        """Every live node."""
        return await self.registry.nodes()

    def dead_letters(self, agent_id: str, *, topic: str | None = None) -> DeadLetters:
        """The dead letters of an agent's inbox, or of its subscription to ``topic``."""
        return DeadLetters.of(self.transport, self.keys, agent_id, topic)
