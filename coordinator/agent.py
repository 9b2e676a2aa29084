"""What handlers see: the message, a context to act on behalf of their agent, and how agents
are registered (an object with ``agent_id`` and ``handle``, or a plain async function)."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from types import UnionType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import codec
from .delivery import Delivery
from .envelope import Envelope
from .errors import CodecError
from .events import AgentEventType, make_event
from .keys import check_name
from .signals import Reject
from .tokens import make_token

if TYPE_CHECKING:
    from .coordinator import MultiAgentCoordinator


class Message:
    """A message delivered to an agent.

    ``payload`` is decoded from msgpack (into ``payload_type`` when the agent registered one);
    ``deliveries`` is Redis's delivery counter (1 on the first attempt).
    """

    __slots__ = ("envelope", "payload", "deliveries", "stream_id")

    def __init__(self, envelope: Envelope, payload: Any, deliveries: int, stream_id: str) -> None:
        self.envelope = envelope
        self.payload = payload
        self.deliveries = deliveries
        self.stream_id = stream_id

    @property
    def id(self) -> str:
        """The message id (stable across redeliveries)."""
        return self.envelope.id

    @property
    def type(self) -> str:
        """The message type (``multiagent:sync`` unless the sender chose another)."""
        return self.envelope.type

    @property
    def session_id(self) -> str | None:
        """The conversation this message belongs to."""
        return self.envelope.session_id

    @property
    def user_id(self) -> str | None:
        """The end user on whose behalf the message was sent."""
        return self.envelope.user_id

    @property
    def sender(self) -> str | None:
        """The agent that sent it (None for messages from outside any agent)."""
        return self.envelope.sender

    @property
    def headers(self) -> dict[str, str]:
        """Free-form string headers set by the sender."""
        return self.envelope.headers

    @property
    def is_request(self) -> bool:
        """Whether the sender waits for a reply (the handler's return value)."""
        return self.envelope.reply_to is not None

    def __repr__(self) -> str:
        return (f"Message(id={self.id!r}, type={self.type!r}, sender={self.sender!r}, "
                f"session_id={self.session_id!r}, deliveries={self.deliveries})")


class Context:
    """Lets a handler send, request and broadcast on behalf of its agent, in the same session."""

    __slots__ = ("agent_id", "message", "_coordinator", "_delivery")

    def __init__(self, coordinator: MultiAgentCoordinator, agent_id: str, message: Message,
                 delivery: Delivery) -> None:
        self._coordinator = coordinator
        self._delivery = delivery
        self.agent_id = agent_id
        self.message = message

    @property
    def node_id(self) -> str:
        """The node running this handler."""
        return self._coordinator.node_id

    @property
    def coordinator(self) -> MultiAgentCoordinator:
        """The coordinator of this node."""
        return self._coordinator

    def _inherit(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault("session_id", self.message.session_id)
        kwargs.setdefault("user_id", self.message.user_id)
        kwargs.setdefault("_sender", self.agent_id)
        kwargs.setdefault("_parent", self.message.envelope)
        return kwargs

    async def send(self, agent_id: str, payload: Any, **kwargs: Any) -> str:
        """Send as this agent; session and user carry over. Returns the message id."""
        sent = await self._coordinator.send(agent_id, payload, **self._inherit(kwargs))
        self.emit(AgentEventType.MESSAGE, {"via": "send", "target": agent_id, "sent_id": sent})
        return sent

    async def request(self, agent_id: str, payload: Any, *, timeout: float, **kwargs: Any) -> Any:
        """Ask another agent and wait for its reply (see MultiAgentCoordinator.request)."""
        kwargs.setdefault("message_id", uuid.uuid4().hex)  # known before the reply arrives
        self.emit(AgentEventType.MESSAGE, {"via": "request", "target": agent_id,
                                           "sent_id": kwargs["message_id"]})
        return await self._coordinator.request(agent_id, payload, timeout=timeout,
                                               **self._inherit(kwargs))

    async def broadcast(self, topic: str, payload: Any, **kwargs: Any) -> str:
        """Publish to every agent subscribed to ``topic``."""
        sent = await self._coordinator.broadcast(topic, payload, **self._inherit(kwargs))
        self.emit(AgentEventType.MESSAGE, {"via": "broadcast", "topic": topic, "sent_id": sent})
        return sent

    def emit(self, type: str, data: dict[str, Any]) -> None:
        """Publish a lifecycle event of this agent about the current message, without waiting.

        Agent, node, session, message id and trace context are filled in. Never raises and
        never blocks: when the event buffer is full the event is dropped (and counted).
        """
        publisher = self._coordinator.event_publisher
        if publisher.enabled:
            publisher.publish_nowait(make_event(type, self.agent_id, self.node_id,
                                                self.message.envelope, dict(data)))

    def emit_token(self, text: str, *, run_id: str | None = None) -> bool:
        """Stream a piece of model output to this session's token stream, without waiting.

        Tokens are ephemeral: they go to a capped, expiring per-session stream (never to the
        durable events stream), for live views on any host (``coordinator events --tokens``,
        ``MultiAgentCoordinator.tokens``, the SSE endpoint). Never raises or blocks; False when
        the token was not queued (no session, buffer full, disabled).
        """
        session_id = self.message.session_id
        publisher = self._coordinator.token_publisher
        if not session_id or not text or not publisher.enabled:
            return False
        return publisher.publish_nowait(make_token(
            text, session_id, agent_id=self.agent_id, node_id=self.node_id,
            message_id=self.message.id, run_id=run_id))

    @property
    def lease_lost(self) -> bool:
        """True once another replica took this message over; stop and do not reply."""
        return self._delivery.lost

    def raise_if_lost(self) -> None:
        """Raise LeaseLost if another replica took this message over."""
        self._delivery.raise_if_lost()


@runtime_checkable
class Agent(Protocol):
    """An agent object: an id and an async ``handle(message, context)``."""

    agent_id: str

    async def handle(self, message: Message, context: Context) -> Any: ...


HandlerFunc = Callable[..., Awaitable[Any]]


class Registration:
    """One agent (or topic subscription) this node serves."""

    __slots__ = ("agent_id", "topic", "payload_type", "concurrency", "_call", "_wants_context")

    def __init__(self, agent_id: str, handler: HandlerFunc, *, topic: str | None = None,
                 payload_type: type | UnionType | None = None,
                 concurrency: int | None = None) -> None:
        self.agent_id = check_name("agent id", agent_id)
        self.topic = topic
        self.payload_type = payload_type
        self.concurrency = concurrency
        self._call = handler
        self._wants_context = _accepts_two_args(handler)

    def decode(self, delivery: Delivery) -> Message:
        """Build the handler's Message; a payload of the wrong shape is rejected for good."""
        envelope = delivery.envelope
        assert envelope is not None
        try:
            payload = codec.decode_payload(envelope.payload, self.payload_type)
        except CodecError as exc:
            raise Reject(f"payload does not match {self.payload_type}: {exc}") from exc
        return Message(envelope, payload, delivery.deliveries, delivery.entry.id.decode())

    def call(self, message: Message, context: Context) -> Awaitable[Any]:
        """The handler's run, to await (not a coroutine of its own: one frame less per
        message)."""
        if self._wants_context:
            return self._call(message, context)
        return self._call(message)


def _accepts_two_args(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def registration_for(agent: Agent | HandlerFunc | str, handler: HandlerFunc | None = None,
                     **options: Any) -> Registration:
    """Normalise the ways an agent can be given: ``(id, func)``, ``(agent)`` or ``(func)``."""
    if isinstance(agent, str):
        if handler is None:
            raise TypeError(f"register({agent!r}) needs a handler")
        return Registration(agent, handler, **options)
    if isinstance(agent, Agent) or (hasattr(agent, "agent_id") and hasattr(agent, "handle")):
        return Registration(str(agent.agent_id), agent.handle, **options)
    if callable(agent) and inspect.iscoroutinefunction(agent):
        return Registration(agent.__name__, agent, **options)
    raise TypeError(f"cannot serve {agent!r}: expected an object with agent_id and async "
                    "handle(message, context), or an async function")
