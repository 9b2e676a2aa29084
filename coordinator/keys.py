"""Every Redis key name, built in one place.

Keys that a single MULTI or Lua call touches together share one hash tag, so the layout works
unchanged on Redis Cluster: an agent's inbox, its dead letters and its dedup window all carry
``{a:<agent_id>}``; a topic's stream, its dead letters and each subscriber's dedup window
carry ``{t:<topic>}``. Different agents land on different slots. Registry keys are touched one at a time and carry no tag.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.:\-/@]{1,200}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is usable inside a key, else raise :class:`ConfigError`.

    Braces are refused because they would break the hash tag of the key.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{kind} {name!r} is not a valid name: expected 1-200 characters of "
            "letters, digits and _ . : - / @"
        )
    return name


class StreamKeys(NamedTuple):
    """The keys of one consumable stream and its companions (same hash tag)."""

    stream: str
    dead_letters: str
    dedup: str


class Keys:
    """Builds key names under a prefix (default ``kiki``)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "kiki") -> None:
        self.prefix = check_name("key prefix", prefix)

    def _tagged(self, tag: str) -> StreamKeys:
        base = f"{self.prefix}:{{{tag}}}"
        return StreamKeys(f"{base}:stream", f"{base}:dead", f"{base}:dedup")

    def inbox(self, agent_id: str) -> StreamKeys:
        """The inbox of an agent, shared by all its replicas."""
        return self._tagged("a:" + check_name("agent id", agent_id))

    def topic(self, topic: str) -> StreamKeys:
        """A broadcast topic; each subscribing agent has its own group on it."""
        return self._tagged("t:" + check_name("topic", topic))

    def subscription(self, topic: str, agent_id: str) -> StreamKeys:
        """A topic as read by one subscribing agent's group: the topic's stream and dead
        letters, with that agent's own dedup window (same hash tag as the stream).

        The dedup window must be per group: a message one subscriber handled is still new
        to every other subscriber of the topic.
        """
        shared = self.topic(topic)
        name = check_name("agent id", agent_id)
        return StreamKeys(shared.stream, shared.dead_letters, f"{shared.dedup}:{name}")

    def replies(self, node_id: str) -> str:
        """The reply stream of one node (request/reply answers land here)."""
        return f"{self.prefix}:{{n:{check_name('node id', node_id)}}}:replies"

    def node(self, node_id: str) -> str:
        """The heartbeat key of a node; it expires when the node stops beating."""
        return f"{self.prefix}:node:{check_name('node id', node_id)}"

    @property
    def nodes(self) -> str:
        """Sorted set of every node seen recently, scored by last beat (ms)."""
        return f"{self.prefix}:nodes"

    @property
    def agents(self) -> str:
        """Set of every agent id that ever had an inbox created (for status)."""
        return f"{self.prefix}:agents"

    @property
    def topics(self) -> str:
        """Set of every topic that has subscribers (for status)."""
        return f"{self.prefix}:topics"

    def events(self) -> str:
        """The lifecycle event stream."""
        return f"{self.prefix}:{{events}}:stream"

    def event_group(self, group: str) -> StreamKeys:
        """The events stream as read by one durable subscriber group, with that group's own
        dead letters and dedup window (same hash tag as the stream)."""
        name = check_name("event group", group)
        return StreamKeys(self.events(), f"{self.prefix}:{{events}}:dead:{name}",
                          f"{self.prefix}:{{events}}:dedup:{name}")

    def tokens(self, session_id: str) -> str:
        """The capped token stream of one session."""
        return f"{self.prefix}:{{s:{check_name('session id', session_id)}}}:tokens"

    def stream_group_for_agent(self, agent_id: str) -> str:
        """The consumer group an agent uses on its inbox and on topics."""
        return check_name("agent id", agent_id)
