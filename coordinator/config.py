"""Frozen configuration Structs, validated at construction. No I/O here.

Durations carry their unit in the name (``_ms``). Every validation error names the key path
(``delivery.max_deliveries``) and what was expected.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from .errors import ConfigError
from .keys import check_name

#: Lifecycle event types a node can subscribe to (the values of ``AgentEventType``).
EVENT_TYPES: tuple[str, ...] = (
    "agent:started", "agent:completed", "agent:failed", "agent:message",
    "agent:tool_call", "agent:tool_result", "multiagent:sync",
)
#: Event bus providers this library implements.
PROVIDERS: tuple[str, ...] = ("redis", "memory")
#: Providers of the seed's EventBus that we deliberately do not implement.
UNSUPPORTED_PROVIDERS: tuple[str, ...] = ("pulsar", "kafka", "nats", "rabbitmq")
#: Where lifecycle events are persisted.
STORAGES: tuple[str, ...] = ("redis", "postgres", "filesystem")

#: Nodes beat every ``heartbeat_ttl_ms / 3``, never more often than this.
MIN_HEARTBEAT_INTERVAL_MS = 50
#: The shortest heartbeat TTL: three beats at the fastest interval.
MIN_HEARTBEAT_TTL_MS = 3 * MIN_HEARTBEAT_INTERVAL_MS

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_ADDR = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(?::(\d{1,5}))?$")
_SECRET_QUERY = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def _require(path: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{path}: expected {expected}, got {value!r}")


def parse_duration_ms(path: str, value: object) -> int:
    """Milliseconds of a duration such as ``"250ms"``, ``"5s"``, ``"1m30s"``, ``"1h"``, ``"7d"``.

    A bare ``0`` is accepted; any other bare number is refused because its unit is ambiguous.

    :param path: key path named in the error message
    :raises ConfigError: negative, malformed or unit-less durations
    """
    if isinstance(value, timedelta):
        _require(path, value >= timedelta(0), "a non-negative duration", str(value))
        return value // timedelta(milliseconds=1)
    expected = "a duration such as '250ms', '5s', '1m' or '1h'"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _require(path, value == 0, f"{expected} (a number needs a unit)", value)
        return 0
    _require(path, isinstance(value, str), expected, value)
    text = str(value).strip().lower().replace(" ", "")
    _require(path, not text.startswith("-"), "a non-negative duration", value)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        _require(path, float(text) == 0, f"{expected} (a number needs a unit)", value)
        return 0
    _require(path, bool(text) and _DURATION_PART.sub("", text) == "", expected, value)
    return round(sum(float(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(text)))


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and reprs).

    Never raises: a URL that does not parse (a port out of range, a broken IPv6 address) or
    a bare ``user:password@host`` has its user info masked by pattern instead.
    """
    base, sep, query = url.partition("?")
    if sep:
        return mask_url(base) + sep + _SECRET_QUERY.sub(r"\1***", query)
    if "://" not in base:
        return _mask_userinfo(base)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return _mask_userinfo(base)


def _mask_userinfo(text: str) -> str:
    """``[scheme://]user:***@rest`` by pattern: everything after the user name's ``:`` up to
    the last ``@`` is masked (a password may hold any character)."""
    head, sep, rest = text.partition("://")
    if not sep:
        head, rest = "", text
    else:
        head += sep
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return text
    user, colon, _ = userinfo.partition(":")
    return f"{head}{user}:***@{host}" if colon else text


def _shown_address(text: str) -> str:
    """An address as error messages may show it: passwords masked, and anything before an
    ``@`` masked entirely when it is not a URL (it may be a bare password)."""
    if "://" in text:
        return mask_url(text)
    userinfo, at, host = text.rpartition("@")
    return f"***@{host}" if at else text


def check_redis_url(path: str, url: str) -> None:
    """Refuse a Redis URL whose scheme, host or port cannot be parsed.

    :param path: key path named in the error message (the URL is shown masked)
    :raises ConfigError: naming ``path``
    """
    expected = "a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        _require(path, scheme in ("redis", "rediss", "unix"), expected, mask_url(url))
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{path}: expected {expected} with a valid host and port "
                          f"(1-65535), got {mask_url(url)!r} ({exc})") from None
    _require(path, port is None or 1 <= port <= 65535,
             f"{expected} with a port in 1-65535", mask_url(url))


def redis_url_from_addr(path: str, addr: object) -> str:
    """A Redis URL from ``host:port``, ``host``, ``[::1]:6379`` or a URL (kept as it is).

    :param path: key path named in the error message
    :raises ConfigError: anything else; a password in the bad value is masked
    """
    expected = "host:port or a redis://, rediss:// or unix:// URL"
    if not isinstance(addr, str):
        _require(path, False, expected, addr)
    text = str(addr).strip()
    _require(path, bool(text), expected, addr)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        _require(path, scheme in ("redis", "rediss", "unix"), expected, mask_url(text))
        check_redis_url(path, text)
        return text
    match = _ADDR.match(text)
    port = int(match.group(2) or 6379) if match else 0
    _require(path, match is not None and 1 <= port <= 65535, expected, _shown_address(text))
    assert match is not None
    return f"redis://{match.group(1)}:{port}"


def url_with_db(url: str, db: int, *, path: str = "redis.db") -> str:
    """``url`` selecting database ``db`` (path, or ``?db=`` for unix sockets).

    :raises ConfigError: if ``url`` already names another database
    """
    base, _, query = url.partition("?")
    unix = base.lower().startswith("unix:")
    named = re.search(r"(?:^|&)db=(\d+)", query) if unix else None
    rest = base.split("://", 1)[-1]
    found = named.group(1) if named else "" if unix or "/" not in rest else rest.split("/", 1)[1]
    if found and found != str(db):
        raise ConfigError(f"{path}: {db!r} conflicts with database {found} in the address "
                          f"({mask_url(url)})")
    if found:
        return url
    if unix:
        return f"{base}?{query}&db={db}" if query else f"{base}?db={db}"
    return f"{base.rstrip('/')}/{db}" + (f"?{query}" if query else "")


def url_without_password(url: str) -> str:
    """``url`` with its password (not its user name) removed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]))


class RedisConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where Redis is and how keys are named.

    :param url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS, ``unix://``)
    :param password: overrides the password of ``url`` when set
    :param prefix: first part of every key (``kiki``)
    :param socket_timeout_s: give up on a reply after this long (reads block for less)
    :param max_connections: connections opened at most, lazily, by each of the two sets: one
        for reads, acks and appends (each consumer holds one in its blocking read), one for
        everything else
    """

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    prefix: str = "kiki"
    socket_timeout_s: float = 10.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        check_redis_url("redis.url", self.url)
        timeout = self.socket_timeout_s
        _require("redis.socket_timeout_s", type(timeout) in (int, float) and timeout > 0,
                 "a positive number", timeout)
        _require("redis.max_connections",
                 type(self.max_connections) is int and self.max_connections >= 4,
                 "an integer >= 4", self.max_connections)
        try:
            check_name("key prefix", self.prefix)
        except ConfigError as exc:
            raise ConfigError(f"redis.prefix: {exc}") from None

    def __repr__(self) -> str:
        secret = "***" if self.password else None
        return (f"RedisConfig(url={mask_url(self.url)!r}, password={secret!r}, "
                f"prefix={self.prefix!r})")


class DeliveryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Delivery semantics of consumers (see DESIGN §3).

    :param concurrency: handler slots per consumed stream; never read more than free slots
    :param claim_idle_ms: an entry idle this long is taken over by the idle claimer (backstop)
    :param claim_interval_ms: how often the claimer looks for idle entries and dead nodes
    :param lease_renew_ms: how often in-flight entries have their idle time reset
    :param heartbeat_ttl_ms: a node whose heartbeat is older than this is dead
    :param max_deliveries: deliveries (Redis's counter) before an entry is dead-lettered
    :param backoff_base_ms: first retry delay; doubles per delivery, with full jitter
    :param backoff_max_ms: upper bound of a retry delay
    :param dedup_window_ms: remember handled message ids this long and skip repeats (0 = off)
    :param inbox_limit: refuse sends to an inbox whose backlog exceeds this (0 = unlimited)
    :param grace_ms: on graceful stop, how long in-flight handlers may still run
    :param block_ms: how long one read waits for new entries
    :param retention_ms: acknowledged entries older than this are trimmed
    :param retention_interval_ms: how often retention runs
    """

    concurrency: int = 128
    claim_idle_ms: int = 30_000
    claim_interval_ms: int = 1_000
    lease_renew_ms: int = 5_000
    heartbeat_ttl_ms: int = 5_000
    max_deliveries: int = 5
    backoff_base_ms: int = 200
    backoff_max_ms: int = 30_000
    dedup_window_ms: int = 0
    inbox_limit: int = 0
    grace_ms: int = 10_000
    block_ms: int = 1_000
    retention_ms: int = 7 * 24 * 3600 * 1000
    retention_interval_ms: int = 60_000

    def __post_init__(self) -> None:
        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            _require(f"delivery.{name}", isinstance(value, int) and value >= minimum,
                     f"an integer >= {minimum}", value)

        for name in ("concurrency", "claim_idle_ms", "claim_interval_ms", "lease_renew_ms",
                     "max_deliveries", "backoff_max_ms", "block_ms", "retention_interval_ms"):
            positive(name)
        _require("delivery.heartbeat_ttl_ms",
                 type(self.heartbeat_ttl_ms) is int
                 and self.heartbeat_ttl_ms >= MIN_HEARTBEAT_TTL_MS,
                 f"an integer >= {MIN_HEARTBEAT_TTL_MS} (nodes beat every ttl/3, at most every "
                 f"{MIN_HEARTBEAT_INTERVAL_MS} ms)", self.heartbeat_ttl_ms)
        for name in ("backoff_base_ms", "dedup_window_ms", "inbox_limit", "grace_ms",
                     "retention_ms"):
            positive(name, 0)
        _require("delivery.lease_renew_ms", self.lease_renew_ms * 2 <= self.claim_idle_ms,
                 f"at most half of claim_idle_ms ({self.claim_idle_ms})", self.lease_renew_ms)
        _require("delivery.backoff_max_ms", self.backoff_max_ms >= self.backoff_base_ms,
                 f"at least delivery.backoff_base_ms ({self.backoff_base_ms})", self.backoff_max_ms)

    @property
    def heartbeat_interval_ms(self) -> int:
        """Beat three times per TTL so one lost beat does not kill a node."""
        return max(MIN_HEARTBEAT_INTERVAL_MS, self.heartbeat_ttl_ms // 3)


def default_node_id() -> str:
    """``hostname-pid-random``: unique per process incarnation."""
    host = socket.gethostname().split(".")[0] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PersistenceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where lifecycle events are kept for replay and audit.

    :param enabled: keep events after delivery (else they are trimmed as soon as read)
    :param storage: ``redis`` (the events stream itself), ``postgres`` or ``filesystem``
    :param retention_days: events older than this are trimmed
    :param directory: where ``filesystem`` storage writes
    :param postgres_url: ``postgresql://user:password@host/db`` for ``postgres`` storage
    """

    enabled: bool = True
    storage: str = "redis"
    retention_days: int = 7
    directory: str | None = None
    postgres_url: str | None = None

    def __post_init__(self) -> None:
        _require("persistence.storage", self.storage in STORAGES,
                 "one of " + ", ".join(STORAGES), self.storage)
        _require("persistence.retention_days",
                 type(self.retention_days) is int and self.retention_days >= 1,
                 "an integer >= 1", self.retention_days)
        if not self.enabled:
            return
        if self.storage == "filesystem":
            _require("persistence.directory", bool(self.directory),
                     "a directory when storage is 'filesystem'", self.directory)
        if self.storage == "postgres":
            scheme = urlsplit(self.postgres_url or "").scheme
            _require("persistence.postgres_url", scheme in ("postgres", "postgresql"),
                     "a postgresql:// URL when storage is 'postgres'",
                     mask_url(self.postgres_url) if self.postgres_url else None)

    def __repr__(self) -> str:
        url = mask_url(self.postgres_url) if self.postgres_url else None
        return (f"PersistenceConfig(enabled={self.enabled!r}, storage={self.storage!r}, "
                f"retention_days={self.retention_days!r}, directory={self.directory!r}, "
                f"postgres_url={url!r})")


class CoordinatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a coordinator needs; build with :meth:`from_url` or :meth:`from_env`.

    Files go through :func:`coordinator.configfile.load_config`.

    :param enabled: the event bus as a whole; when false no lifecycle events are published
    :param provider: ``redis`` or ``memory`` (single process, tests)
    :param publish_events: publish lifecycle events (the seed's ``publish.enabled``)
    :param publish_async: publish without waiting for Redis to confirm
    :param publish_timeout_ms: give up on one publish after this long
    :param subscribe_events: lifecycle event types a node listens to
    """

    redis: RedisConfig = RedisConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    node_id: str | None = None
    publish_events: bool = True
    events_retention_ms: int = 7 * 24 * 3600 * 1000
    enabled: bool = True
    provider: str = "redis"
    publish_async: bool = True
    publish_timeout_ms: int = 5_000
    subscribe_events: tuple[str, ...] = EVENT_TYPES
    persistence: PersistenceConfig = PersistenceConfig()

    def __post_init__(self) -> None:
        if self.provider in UNSUPPORTED_PROVIDERS:
            raise ConfigError(f"provider: {self.provider!r} is not supported, use redis "
                              "(or memory for a single process)")
        _require("provider", self.provider in PROVIDERS, "one of " + ", ".join(PROVIDERS),
                 self.provider)
        _require("publish_timeout_ms",
                 type(self.publish_timeout_ms) is int and self.publish_timeout_ms >= 1,
                 "an integer >= 1", self.publish_timeout_ms)
        _require("events_retention_ms",
                 type(self.events_retention_ms) is int and self.events_retention_ms >= 0,
                 "an integer >= 0", self.events_retention_ms)
        _require("subscribe_events", isinstance(self.subscribe_events, tuple),
                 "a tuple of event types", self.subscribe_events)
        for event in self.subscribe_events:
            _require("subscribe_events", event in EVENT_TYPES,
                     "event types among " + ", ".join(EVENT_TYPES), event)
        timeout_ms = self.redis.socket_timeout_s * 1000
        _require("delivery.block_ms", self.delivery.block_ms < timeout_ms,
                 f"less than redis.socket_timeout_s ({self.redis.socket_timeout_s:g} s = "
                 f"{timeout_ms:g} ms) so a blocking read ends before its socket times out",
                 self.delivery.block_ms)
        if self.node_id is not None:
            try:
                check_name("node id", self.node_id)
            except ConfigError as exc:
                raise ConfigError(f"node_id: {exc}") from None

    @property
    def publish_enabled(self) -> bool:
        """The seed's name for :attr:`publish_events`."""
        return self.publish_events

    def describe(self) -> dict[str, object]:
        """The effective configuration as a JSON-able dict, secrets masked."""
        data: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(self))
        data["redis"]["url"] = mask_url(self.redis.url)
        data["redis"]["password"] = "***" if self.redis.password else None
        if self.persistence.postgres_url:
            data["persistence"]["postgres_url"] = mask_url(self.persistence.postgres_url)
        return data

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> CoordinatorConfig:
        """A config pointing at ``url`` with default delivery settings."""
        delivery = overrides.pop("delivery", None) or DeliveryConfig()
        prefix = overrides.pop("prefix", "kiki")
        return cls(redis=RedisConfig(url=url, prefix=prefix), delivery=delivery, **overrides)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CoordinatorConfig:
        """A config from ``KIKI_REDIS_URL``, ``KIKI_PREFIX`` and ``KIKI_NODE_ID``.

        :func:`coordinator.configfile.load_config` reads every ``KIKI_*`` variable.
        """
        env = os.environ if environ is None else environ
        return cls(
            redis=RedisConfig(url=env.get("KIKI_REDIS_URL", RedisConfig.url),
                              prefix=env.get("KIKI_PREFIX", "kiki")),
            node_id=env.get("KIKI_NODE_ID") or None,
        )
