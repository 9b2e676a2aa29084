"""The Redis boundary: a Protocol for the engine and its redis.asyncio implementation."""

from .protocol import ClaimBatch, ConsumerInfo, Entry, GroupInfo, PendingEntry, StreamTransport
from .memory import MemoryTransport
from .redis import RedisTransport

__all__ = ["ClaimBatch", "ConsumerInfo", "Entry", "GroupInfo", "MemoryTransport", "PendingEntry",
           "RedisTransport", "StreamTransport"]
