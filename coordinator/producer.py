"""Building and appending envelopes to streams."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec

from . import codec
from .envelope import MULTI_AGENT_SYNC, Envelope
from .registry import now_ms
from .transport import StreamTransport


# 64 random bits per process incarnation plus a counter: unique across nodes without paying
# for a uuid4 (os.urandom) per message.
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def _reseed_ids() -> None:
    """A forked child must not reuse its parent's prefix and counter."""
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = uuid.uuid4().hex[:16]
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_ids)


def new_message_id() -> str:
    """A globally unique message id (random per process, then a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def make_envelope(target: str, payload: Any, *, type: str = MULTI_AGENT_SYNC,
                  **fields: Any) -> Envelope:
    """An envelope for ``payload`` (encoded once, here) with a fresh id and timestamp."""
    return Envelope(id=fields.pop("id", None) or new_message_id(), type=type, target=target,
                    created_ms=now_ms(), payload=codec.encode_payload(payload), **fields)


def envelopes_like(template: Envelope, payloads: Iterable[Any]) -> list[Envelope]:
    """One envelope per payload with ``template``'s fields, each with a fresh id: copying a
    template costs a fifth of building every envelope of a batch from keywords."""
    replace, encode = msgspec.structs.replace, codec.encode_payload
    return [replace(template, id=new_message_id(), payload=encode(payload))
            for payload in payloads]


async def append(transport: StreamTransport, stream: str, envelope: Envelope) -> bytes:
    """Append one envelope to a stream; returns the stream id."""
    return await transport.add(stream, codec.encode(envelope))
