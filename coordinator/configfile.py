"""Reading the event bus configuration file (``config/eventbus.yaml``) into a config Struct.

Precedence, lowest first: built-in defaults, the file, ``KIKI_*`` environment variables, then
``overrides`` (what command-line flags give). String values in the file may use ``${VAR}`` and
``${VAR:-default}``. Every mistake raises one :class:`ConfigError` naming the key path (or the
environment variable), the bad value and what was expected; secrets are never echoed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import yaml

from .config import (
    EVENT_TYPES, MIN_HEARTBEAT_TTL_MS, PROVIDERS, STORAGES, UNSUPPORTED_PROVIDERS,
    CoordinatorConfig, DeliveryConfig,
    PersistenceConfig, RedisConfig, parse_duration_ms, redis_url_from_addr, url_with_db,
    url_without_password,
)
from .errors import ConfigError
from .keys import check_name

__all__ = ["CONFIG_ENV", "ENV_SETTINGS", "load_config", "parse_config"]

#: Environment variable naming the file ``load_config()`` reads when given no path.
CONFIG_ENV = "KIKI_CONFIG"

Coerce = Callable[[str, object], object]
_REF = re.compile(r"\$\{([^}]*)\}")
_REF_BODY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_SECRETS = ("redis.password", "redis.url", "redis.addr", "persistence.postgres_url")
_DAY_MS = 86_400_000


class _Value(NamedTuple):
    value: object
    source: str  # where it came from: a key path, an environment variable or an override
    given: object  # what the user wrote, for messages


_Draft = dict[str, _Value]


def _fail(path: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one_of(values: tuple[str, ...] | list[str]) -> str:
    return "one of " + ", ".join(values)


# -- value coercers: (path, value) -> value, raising ConfigError -------------------------------


def _bool(path: str, value: object) -> object:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _fail(path, "true or false", value)


def _int(minimum: int) -> Coerce:
    def coerce(path: str, value: object) -> object:
        number: object = value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            number = int(value)
        if type(number) is not int or number < minimum:
            raise _fail(path, f"an integer >= {minimum}", value)
        return number
    return coerce


def _duration(minimum_ms: int, *, seconds: bool = False) -> Coerce:
    def coerce(path: str, value: object) -> object:
        ms = parse_duration_ms(path, value)
        if ms < minimum_ms:
            raise _fail(path, f"a duration of at least {minimum_ms}ms", value)
        return ms / 1000 if seconds else ms
    return coerce


def _text(path: str, value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "a non-empty string", value)
    return value.strip()


def _secret(path: str, value: object) -> object:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string (quote it in YAML), "
                          f"got a value of type {type(value).__name__}")
    return value


def _choice(choices: tuple[str, ...]) -> Coerce:
    def coerce(path: str, value: object) -> object:
        text = value.strip().lower() if isinstance(value, str) else None
        if choices == PROVIDERS and text in UNSUPPORTED_PROVIDERS:
            raise ConfigError(f"{path}: provider {value!r} is not supported, use redis "
                              "(or memory for a single process)")
        if text not in choices:
            hint = _suggest(text, list(choices)) if text else ""
            raise ConfigError(f"{path}: expected {_one_of(choices)}, got {value!r}{hint}")
        return text
    return coerce


def _name(kind: str) -> Coerce:
    def coerce(path: str, value: object) -> object:
        try:
            return check_name(kind, value)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return coerce


def _prefix(path: str, value: object) -> object:
    """The seed's ``channel_prefix`` ends with a separator; our keys add their own."""
    if isinstance(value, str):
        value = value.strip().rstrip(":")
    return _name("key prefix")(path, value)


def _events(path: str, value: object) -> object:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise _fail(path, "a list of event types", value)
    seen: list[str] = []
    for index, event in enumerate(value):
        if event not in EVENT_TYPES:
            hint = _suggest(event, list(EVENT_TYPES)) if isinstance(event, str) else ""
            raise ConfigError(f"{path}[{index}]: unknown event type {event!r}{hint} "
                              f"(expected {_one_of(EVENT_TYPES)})")
        if event not in seen:
            seen.append(event)
    return tuple(seen)


# -- the file's schema: section -> key -> (field path, coercer) ------------------------------

# delivery key -> (DeliveryConfig field, minimum); fields ending in ``_ms`` are durations.
_DELIVERY: dict[str, tuple[str, int]] = {
    "claim_idle": ("claim_idle_ms", 1), "claim_interval": ("claim_interval_ms", 1),
    "lease_renew": ("lease_renew_ms", 1),
    "heartbeat_ttl": ("heartbeat_ttl_ms", MIN_HEARTBEAT_TTL_MS),
    "max_deliveries": ("max_deliveries", 1), "backoff_base": ("backoff_base_ms", 0),
    "backoff_max": ("backoff_max_ms", 1), "inbox_limit": ("inbox_limit", 0),
    "dedup_window": ("dedup_window_ms", 0), "grace": ("grace_ms", 0), "block": ("block_ms", 1),
    "retention": ("retention_ms", 0), "retention_interval": ("retention_interval_ms", 1),
}
_DELIVERY_KEYS: dict[str, tuple[str, Coerce]] = {
    key: (f"delivery.{field}", _duration(low) if field.endswith("_ms") else _int(low))
    for key, (field, low) in _DELIVERY.items()
}
# The same durations as integer milliseconds (``KIKI_CLAIM_IDLE_MS``, ``claim_idle_ms=...``).
_DELIVERY_MS: dict[str, tuple[str, Coerce]] = {
    field: (f"delivery.{field}", _int(low))
    for field, low in _DELIVERY.values() if field.endswith("_ms")
}

_SECTIONS: dict[str, dict[str, tuple[str, Coerce]]] = {
    "": {"enabled": ("enabled", _bool), "provider": ("provider", _choice(PROVIDERS))},
    "redis": {
        "addr": ("redis.addr", redis_url_from_addr), "password": ("redis.password", _secret),
        "db": ("redis.db", _int(0)), "channel_prefix": ("redis.prefix", _prefix),
        "socket_timeout": ("redis.socket_timeout_s", _duration(1, seconds=True)),
        "max_connections": ("redis.max_connections", _int(4)),
    },
    "publish": {"enabled": ("publish_events", _bool), "async": ("publish_async", _bool),
                "timeout": ("publish_timeout_ms", _duration(1))},
    "subscribe": {"events": ("subscribe_events", _events),
                  "workers": ("delivery.concurrency", _int(1))},
    "persistence": {
        "enabled": ("persistence.enabled", _bool),
        "storage": ("persistence.storage", _choice(STORAGES)),
        "retention_days": ("persistence.retention_days", _int(1)),
        "directory": ("persistence.directory", _text),
        "postgres_url": ("persistence.postgres_url", _secret),
    },
    "delivery": _DELIVERY_KEYS,
}

#: Flat settings read from ``KIKI_<NAME>`` and accepted as ``overrides`` keys (``<name>``).
ENV_SETTINGS: dict[str, tuple[str, Coerce]] = {
    "redis_url": ("redis.url", redis_url_from_addr),
    "redis_password": ("redis.password", _secret),
    "prefix": ("redis.prefix", _prefix),
    "node_id": ("node_id", _name("node id")),
    "provider": ("provider", _choice(PROVIDERS)),
    "concurrency": ("delivery.concurrency", _int(1)),
    "publish_timeout": ("publish_timeout_ms", _duration(1)),
    "publish_events": ("publish_events", _bool),
    "postgres_url": ("persistence.postgres_url", _secret),
    **_DELIVERY_KEYS,
    **_DELIVERY_MS,
}

# Field path -> where a file user sets it, for messages about defaults that clash.
_FILE_PATHS = {field: f"eventbus.{section + '.' if section else ''}{key}"
               for section, keys in _SECTIONS.items() for key, (field, _) in keys.items()}
_FILE_PATHS["redis.url"] = "eventbus.redis.addr"


# -- ${VAR} expansion ---------------------------------------------------------------------


def _expand(path: str, value: object, environ: Mapping[str, str], *,
            secret: bool = False) -> object:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (the default also replaces an empty value).

    Lists are expanded item by item. A ``secret`` value is never quoted in errors.
    """
    if isinstance(value, list):
        return [_expand(f"{path}[{i}]", item, environ) for i, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        body = _REF_BODY.match(match.group(1))
        if body is None:
            shown = "" if secret else f" {match.group(0)!r}"
            raise ConfigError(f"{path}: malformed reference{shown}, expected "
                              "${VAR} or ${VAR:-default}")
        name, default = body.group(1), body.group(2)
        found = environ.get(name)
        if default is not None:
            return found or default
        if found is None:
            raise ConfigError(f"{path}: environment variable {name} is not set (referenced as "
                              f"${{{name}}}; set it or write ${{{name}:-default}})")
        return found

    if "${" in _REF.sub("", value):
        shown = "" if secret else f" in {value!r}"
        raise ConfigError(f"{path}: unterminated reference{shown}, expected "
                          "${VAR} or ${VAR:-default}")
    return _REF.sub(replace, value)


# -- layers ---------------------------------------------------------------------------------


def _mapping(path: str, value: object) -> Mapping[Any, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, "a mapping of keys to values", value)
    return value


def _check_keys(path: str, data: Mapping[Any, object], known: list[str]) -> None:
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            hint = _suggest(key, known) if isinstance(key, str) else ""
            raise ConfigError(f"{where}: unknown key{hint} (expected {_one_of(sorted(known))})")


def _read_document(data: Mapping[Any, object], environ: Mapping[str, str]) -> _Draft:
    root = _mapping("(document)", data)
    _check_keys("", root, ["eventbus"])
    if "eventbus" not in root:
        raise ConfigError("eventbus: missing section, expected a top-level 'eventbus' mapping")
    section = _mapping("eventbus", root["eventbus"])
    top = _SECTIONS[""]
    _check_keys("eventbus", section, [*top, *(name for name in _SECTIONS if name)])
    draft: _Draft = {}
    for key, value in section.items():
        assert isinstance(key, str)
        path = f"eventbus.{key}"
        if key in top:
            _put(draft, path, top[key], value, environ)
            continue
        table = _SECTIONS[key]
        sub = _mapping(path, value)
        _check_keys(path, sub, list(table))
        for name, item in sub.items():
            _put(draft, f"{path}.{name}", table[str(name)], item, environ)
    _combine_addr(draft)
    return draft


def _put(draft: _Draft, source: str, spec: tuple[str, Coerce], raw: object,
         environ: Mapping[str, str]) -> None:
    field, coerce = spec
    value = _expand(source, raw, environ, secret=field in _SECRETS)
    if field == "redis.db" and value == "":
        value = 0  # ``db: ${REDIS_DB:-}``
    draft[field] = _Value(coerce(source, value), source, value)


def _combine_addr(draft: _Draft) -> None:
    """Fold ``redis.addr`` and ``redis.db`` into one URL."""
    addr, db = draft.pop("redis.addr", None), draft.pop("redis.db", None)
    first = addr or db
    if first is None:
        return
    url = str(addr.value) if addr else "redis://127.0.0.1:6379"
    if db is not None:
        url = url_with_db(url, cast(int, db.value), path=db.source)
    draft["redis.url"] = _Value(url, first.source, first.given)


def _read_flat(draft: _Draft, values: Mapping[str, object], label: Callable[[str], str]) -> None:
    """Settings named as in :data:`ENV_SETTINGS`; ``None`` and empty values count as unset."""
    for name, (field, coerce) in ENV_SETTINGS.items():
        key = label(name)
        raw = values.get(key)
        if raw is not None and raw != "":
            draft[field] = _Value(coerce(key, raw), key, raw)


def _read_env(draft: _Draft, environ: Mapping[str, str]) -> None:
    _read_flat(draft, environ, lambda name: f"KIKI_{name.upper()}")


def _read_overrides(draft: _Draft, overrides: Mapping[str, object]) -> None:
    _check_keys("overrides", overrides, list(ENV_SETTINGS))
    _read_flat(draft, {f"overrides.{k}": v for k, v in overrides.items()},
               lambda name: f"overrides.{name}")


# -- building the Structs -------------------------------------------------------------------


def _build(draft: _Draft) -> CoordinatorConfig:
    groups: dict[str, dict[str, object]] = {"redis": {}, "delivery": {}, "persistence": {}}
    top: dict[str, object] = {}
    for field, item in draft.items():
        head, _, name = field.partition(".")
        if name and head in groups:
            groups[head][name] = item.value
        else:
            top[field] = item.value
    if groups["redis"].get("password") and isinstance(groups["redis"].get("url"), str):
        # redis-py prefers a URL's password to a separate one; ours is documented to win.
        groups["redis"]["url"] = url_without_password(str(groups["redis"]["url"]))
    days = draft.get("persistence.retention_days")
    if days is not None and isinstance(days.value, int):
        top["events_retention_ms"] = days.value * _DAY_MS
    try:
        return CoordinatorConfig(
            redis=RedisConfig(**groups["redis"]),  # type: ignore[arg-type]
            delivery=DeliveryConfig(**groups["delivery"]),  # type: ignore[arg-type]
            persistence=PersistenceConfig(**groups["persistence"]),  # type: ignore[arg-type]
            **top,  # type: ignore[arg-type]
        )
    except ConfigError as exc:
        raise _relabel(exc, draft) from None


def _relabel(exc: ConfigError, draft: _Draft) -> ConfigError:
    """Name where the user set a value that failed a cross-field check."""
    field, sep, rest = str(exc).partition(": ")
    if not sep:
        return exc
    # Other settings the message names (a cross-field check): say where they were set.
    others = "".join(f"; {name} is set by {other.source}" for name, other in draft.items()
                     if name != field and re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", rest))
    item = draft.get(field)
    if item is None:
        return ConfigError(f"{_FILE_PATHS.get(field, field)} (not set): {rest}{others}")
    given = ""
    if field not in _SECRETS and item.given != item.value:
        given = f" (given as {item.given!r})"
    return ConfigError(f"{item.source}: {rest}{given}{others}")


# -- public API -----------------------------------------------------------------------------


def parse_config(data: Mapping[str, object], *, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, object] | None = None) -> CoordinatorConfig:
    """Build a config from a parsed document (``{"eventbus": {...}}``), env and overrides.

    :param environ: expands ``${VAR}`` and supplies ``KIKI_*`` settings (default ``os.environ``)
    :param overrides: flat settings from command-line flags (``redis_url``, ``node_id``,
        ``concurrency``, ...; see :data:`ENV_SETTINGS`); ``None`` values are ignored
    :raises ConfigError: naming the key path, the bad value and what was expected
    """
    env = os.environ if environ is None else environ
    draft = _read_document(data, env)
    _read_env(draft, env)
    _read_overrides(draft, overrides or {})
    return _build(draft)


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> CoordinatorConfig:
    """Load a YAML config file; see :func:`parse_config` for ``environ`` and ``overrides``.

    :param path: the file; when ``None``, ``$KIKI_CONFIG`` if set, else no file (defaults,
        environment and overrides only)
    :raises ConfigError: on a missing or unreadable file, invalid YAML (with line and column)
        or any wrong value
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data = {"eventbus": None} if path is None else _read_yaml(Path(path))
    return parse_config(data, environ=env, overrides=overrides)


def _read_yaml(path: Path) -> Mapping[Any, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(path, exc)) from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty, expected an 'eventbus' section")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with an 'eventbus' section, "
                          f"got a {type(data).__name__}")
    return data


def _yaml_message(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: invalid YAML: {problem}"
    return (f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
            f"{problem}")
