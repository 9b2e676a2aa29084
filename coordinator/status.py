"""Operator views: per-agent and per-stream health, read from Redis (for `agents()` and the
`coordinator status` / `coordinator agents` commands)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from .envelope import NodeInfo
from .errors import TransportError
from .keys import Keys, StreamKeys
from .registry import now_ms
from .transport import GroupInfo, StreamTransport


class GroupStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One consumer group of a stream."""

    group: str
    consumers: int
    pending: int
    lag: int | None
    oldest_pending_age_ms: int | None


class StreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One stream (inbox or topic) with its groups and dead letters."""

    name: str
    stream: str
    length: int
    groups: list[GroupStatus]
    dead_letters: int

    @property
    def backlog(self) -> int:
        """Unhandled entries of the slowest group (length when no group exists yet)."""
        return backlog_of(self.length, self.groups)


def backlog_of(length: int, groups: Sequence[GroupInfo | GroupStatus]) -> int:
    """Unhandled entries of the slowest group; the whole length when no group exists yet."""
    if not groups:
        return length
    return max((g.lag if g.lag is not None else length) + g.pending for g in groups)


async def stream_backlog(transport: StreamTransport, stream: str) -> int:
    """Entries of a stream not yet acknowledged by its slowest group."""
    groups = await transport.groups(stream)
    length = 0
    if not groups or any(g.lag is None for g in groups):
        length = await transport.length(stream)
    return backlog_of(length, groups)


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One agent: where it runs and how its inbox is doing."""

    agent_id: str
    nodes: list[str]
    backlog: int
    pending: int
    oldest_pending_age_ms: int | None
    dead_letters: int


async def stream_status(transport: StreamTransport, name: str, keys: StreamKeys) -> StreamStatus:
    """Length, groups (pending, lag, oldest pending age) and dead letters of one stream."""
    groups = []
    now = now_ms()
    for group in await transport.groups(keys.stream):
        oldest_age = None
        if group.pending:
            try:
                first = await transport.pending(keys.stream, group.name, 1)
            except TransportError:
                first = []
            if first:
                oldest_age = now - int(first[0].id.split(b"-")[0])
        groups.append(GroupStatus(group=group.name, consumers=group.consumers,
                                  pending=group.pending, lag=group.lag,
                                  oldest_pending_age_ms=oldest_age))
    return StreamStatus(name=name, stream=keys.stream, length=await transport.length(keys.stream),
                        groups=groups, dead_letters=await transport.length(keys.dead_letters))


async def agent_statuses(transport: StreamTransport, keys: Keys,
                         nodes: Sequence[NodeInfo]) -> list[AgentStatus]:
    """Every agent known to the registry or ever sent to, with its live nodes."""
    hosts: dict[str, list[str]] = {}
    for node in nodes:
        for agent_id in node.agents:
            hosts.setdefault(agent_id, []).append(node.node_id)
    names = sorted(set(await transport.set_members(keys.agents)) | set(hosts))
    result = []
    for agent_id in names:
        status = await stream_status(transport, agent_id, keys.inbox(agent_id))
        group = next((g for g in status.groups if g.group == agent_id), None)
        result.append(AgentStatus(
            agent_id=agent_id, nodes=sorted(hosts.get(agent_id, [])), backlog=status.backlog,
            pending=group.pending if group else 0,
            oldest_pending_age_ms=group.oldest_pending_age_ms if group else None,
            dead_letters=status.dead_letters))
    return result


async def topic_statuses(transport: StreamTransport, keys: Keys) -> list[StreamStatus]:
    """Every topic that had subscribers, with one group per subscribing agent."""
    return [await stream_status(transport, topic, keys.topic(topic))
            for topic in await transport.set_members(keys.topics)]
