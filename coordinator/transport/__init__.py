"""The Redis boundary: a Protocol for the engine and its redis.asyncio implementation."""

from .protocol import (
    AckWrite,
    AppendWrite,
    ClaimBatch,
    ConsumerInfo,
    Entry,
    GroupInfo,
    PendingEntry,
    Piggyback,
    PiggybackSource,
    StreamTransport,
)
from .memory import MemoryTransport
from .redis import RedisTransport

__all__ = ["AckWrite", "AppendWrite", "ClaimBatch", "ConsumerInfo", "Entry", "GroupInfo",
           "MemoryTransport", "PendingEntry", "Piggyback", "PiggybackSource", "RedisTransport",
           "StreamTransport"]
