"""Kiki Coordinator: reliable multi-agent coordination over Redis Streams consumer groups."""

from .agent import Agent, Context, Message
from .config import CoordinatorConfig, DeliveryConfig, RedisConfig
from .coordinator import MultiAgentCoordinator
from .deadletter import DeadLetter, DeadLetters
from .envelope import Envelope, NodeInfo, Reply
from .eventbus import EventBus, get_eventbus
from .events import AgentEvent, AgentEventType, EventPublisher
from .errors import (BacklogFull, CodecError, ConfigError, ConnectionLost, CoordinatorError,
                     LeaseLost, RemoteError, RequestTimeout, TransportError)
from .signals import Reject, Retry
from .status import AgentStatus

__all__ = [
    "Agent", "AgentEvent", "AgentEventType", "AgentStatus", "BacklogFull", "CodecError",
    "ConfigError", "ConnectionLost", "Context", "CoordinatorConfig", "CoordinatorError",
    "DeadLetter", "DeadLetters", "DeliveryConfig", "Envelope", "EventBus", "EventPublisher",
    "LeaseLost", "Message", "MultiAgentCoordinator", "NodeInfo", "RedisConfig", "Reject",
    "RemoteError", "Reply", "RequestTimeout", "Retry", "TransportError", "get_eventbus",
]
