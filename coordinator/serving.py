"""Turns a registered agent into an engine handler: deadline check, decode, run, reply."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from . import codec, policy
from .agent import Context, Registration
from .deadletter import REDRIVE_HEADER
from .delivery import Delivery
from .envelope import Reply
from .errors import CodecError, TransportError
from .events import EVENTS_TOPIC, AgentEventType
from .registry import now_ms
from .replies import REPLY_STREAM_TTL_MS
from .signals import Reject, Retry

if TYPE_CHECKING:
    from .coordinator import MultiAgentCoordinator

log = logging.getLogger(__name__)

# Plain strings: enum member lookups cost on a path taken twice per message.
_STARTED = AgentEventType.STARTED.value
_COMPLETED = AgentEventType.COMPLETED.value
_FAILED = AgentEventType.FAILED.value


class AgentServer:
    """The engine-facing handler of one registration on one node."""

    def __init__(self, coordinator: MultiAgentCoordinator, registration: Registration,
                 max_deliveries: int) -> None:
        self._coordinator = coordinator
        self._registration = registration
        self._max_deliveries = max_deliveries
        self._publisher = coordinator.event_publisher
        self._telemetry = coordinator.telemetry
        self._agent_id = registration.agent_id
        self._node_id = coordinator.node_id
        self._topic = registration.topic
        # Handling an event must not publish more events.
        self._emits = registration.topic != EVENTS_TOPIC
        self.handled = 0
        self.expired = 0

    def __call__(self, delivery: Delivery) -> Awaitable[None]:
        # A plain call returning the coroutine to await: one frame less per message.
        if not self._telemetry.active:  # no SDK installed: nothing to trace
            return self._handle(delivery)
        return self._traced(delivery)

    async def _traced(self, delivery: Delivery) -> None:
        registration = self._registration
        with self._telemetry.process(delivery, registration.agent_id,
                                     registration.topic) as processing:
            try:
                await self._handle(delivery)
            except Exception as exc:
                final = not isinstance(exc, Retry) and self._final(delivery, exc)
                processing.failed(exc, dead_lettered=final and not delivery.lost)
                raise

    async def _handle(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        assert envelope is not None
        # Clock reads cost a system call on some hosts: only take the ones that are needed.
        if envelope.deadline_ms is not None and policy.is_expired(envelope.deadline_ms,
                                                                  now_ms()):
            # The caller stopped waiting: starting the work now would only waste it.
            self.expired += 1
            log.info("skipped expired message", extra={"message_id": envelope.id,
                                                         "agent_id": self._registration.agent_id})
            return
        if envelope.headers and envelope.headers.get(REDRIVE_HEADER, self._agent_id) \
                != self._agent_id:
            return  # redriven from another subscriber's dead letters: not ours to run again
        registration = self._registration
        publisher = self._publisher
        publishing = self._emits and publisher.enabled
        started_ms = 0
        if publishing:
            if publisher.block:
                await publisher.wait_for_space()
            started_ms = now_ms()
            # Data built in place here and below, not by _data(**kwargs): once per message.
            data: dict[str, object] = {"deliveries": delivery.deliveries}
            if self._topic:
                data["topic"] = self._topic
            publisher.publish_about(_STARTED, self._agent_id, self._node_id, envelope, data,
                                    started_ms)
        try:
            message = registration.decode(delivery)
            context = Context(self._coordinator, registration.agent_id, message, delivery)
            result = await registration.call(message, context)
        except Retry as signal:
            await self._failed(delivery, signal, started_ms, final=False)
            raise
        except Exception as exc:
            final = self._final(delivery, exc)
            if envelope.reply_to and final:
                await self._reply(delivery, None, exc)
            await self._failed(delivery, exc, started_ms, final=final)
            raise
        self.handled += 1
        reply_bytes = 0
        if envelope.reply_to and not delivery.lost:
            reply_bytes = await self._reply(delivery, result, None)
        if publishing:
            if publisher.block:
                await publisher.wait_for_space()
            ended_ms = now_ms()
            data = {"duration_ms": ended_ms - started_ms, "reply_bytes": reply_bytes,
                    "deliveries": delivery.deliveries}
            if self._topic:
                data["topic"] = self._topic
            publisher.publish_about(_COMPLETED, self._agent_id, self._node_id, envelope, data,
                                    ended_ms)

    def _data(self, **data: object) -> dict[str, object]:
        """Event data, with the topic for a subscription."""
        if self._topic:
            data["topic"] = self._topic
        return data

    async def _failed(self, delivery: Delivery, exc: Exception, started_ms: int, *,
                      final: bool) -> None:
        assert delivery.envelope is not None
        publisher = self._publisher
        if not (self._emits and publisher.enabled):
            return
        await publisher.wait_for_space()
        # What the consumer does next: the new owner decides after a lost lease, a Reject or
        # the last allowed delivery dead-letters, anything else is retried.
        ended_ms = now_ms()
        publisher.publish_about(_FAILED, self._agent_id, self._node_id, delivery.envelope,
                                self._data(error_type=type(exc).__name__, error=str(exc)[:2000],
                                           deliveries=delivery.deliveries,
                                           duration_ms=ended_ms - started_ms,
                                           will_retry=not final and not delivery.lost,
                                           dead_lettered=final and not delivery.lost,
                                           lease_lost=delivery.lost), ended_ms)

    def _final(self, delivery: Delivery, exc: Exception) -> bool:
        return isinstance(exc, Reject) or policy.should_dead_letter(delivery.deliveries,
                                                                    self._max_deliveries)

    async def _reply(self, delivery: Delivery, result: Any, exc: Exception | None) -> int:
        """Send the reply; returns the size of its payload (0 when none was sent)."""
        envelope = delivery.envelope
        assert envelope is not None and envelope.reply_to and envelope.correlation_id
        if not self._coordinator.is_reply_stream(envelope.reply_to):
            log.warning("refusing to reply to a foreign key",
                        extra={"message_id": envelope.id, "reply_to": envelope.reply_to})
            return 0
        try:
            payload = codec.encode_payload(result)
            reply = Reply(correlation_id=envelope.correlation_id,
                          sender=self._registration.agent_id,
                          sender_node=self._coordinator.node_id, created_ms=now_ms(),
                          payload=payload, ok=exc is None,
                          error_type=type(exc).__name__ if exc else None,
                          error=str(exc)[:2000] if exc else None)
        except CodecError as encode_error:
            reply = Reply(correlation_id=envelope.correlation_id,
                          sender=self._registration.agent_id,
                          sender_node=self._coordinator.node_id, created_ms=now_ms(), ok=False,
                          error_type="CodecError", error=str(encode_error))
        try:
            # The requester may have crashed: its reply stream must not outlive it for good.
            await self._coordinator.transport.add_expiring(envelope.reply_to, codec.encode(reply),
                                                           REPLY_STREAM_TTL_MS)
        except TransportError as send_error:
            if exc is None:
                raise  # not acked: the message is retried and the reply sent again
            log.warning("error reply could not be sent: %s", send_error,
                        extra={"message_id": envelope.id})
            return 0
        return len(reply.payload)
