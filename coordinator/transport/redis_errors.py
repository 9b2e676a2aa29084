"""Redis errors mapped once into the coordinator's hierarchy (for every redis.asyncio call)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions as rex

from ..errors import ConnectionLost, GroupMissing, TransportError

_CODE = re.compile(r"\b(NOGROUP|UNBLOCKED|BUSYGROUP|NOSCRIPT|WRONGTYPE|OOM|READONLY|LOADING)\b")


def error_code(exc: rex.ResponseError) -> str:
    """The Redis error code of a reply error (``NOGROUP``...), also inside script errors."""
    text = str(exc)
    first = text.split(" ", 1)[0]
    if first.isupper() and first not in ("ERR", "Error"):
        return first
    match = _CODE.search(text)
    return match.group(1) if match else "ERR"


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translate redis-py exceptions into the coordinator's hierarchy."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise ConnectionLost(f"Redis connection failed: {exc}") from exc
    except rex.ResponseError as exc:
        if error_code(exc) in ("NOGROUP", "UNBLOCKED"):  # UNBLOCKED: key deleted mid-read
            raise GroupMissing(str(exc)) from exc
        raise TransportError(str(exc)) from exc


def mapped_error(exc: rex.RedisError | OSError) -> TransportError:
    """One error as the coordinator's exception (for errors read or caught, not raised)."""
    try:
        with mapped_errors():
            raise exc
    except TransportError as mapped:
        return mapped
    raise AssertionError("unreachable")
