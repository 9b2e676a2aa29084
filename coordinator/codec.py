"""Encoding of wire messages and user payloads. The only module that knows the byte layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import UnionType
from typing import Any, TypeVar

import msgspec

from .envelope import AgentEvent, Envelope, EventBatch, NodeInfo, Reply
from .errors import CodecError

T = TypeVar("T")

#: The stream field holding the encoded wire message.
FIELD = b"e"

_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_node_decoder = msgspec.msgpack.Decoder(NodeInfo)
_event_decoder = msgspec.msgpack.Decoder(AgentEvent | EventBatch)
_any_decoder = msgspec.msgpack.Decoder()
_NIL = msgspec.Raw(b"\xc0")


def encode(message: Envelope | Reply | NodeInfo | AgentEvent | EventBatch) -> bytes:
    """Encode a wire message to msgpack bytes."""
    return _encoder.encode(message)


def encode_payload(payload: Any) -> msgspec.Raw:
    """Encode a user payload once, so it can travel without being decoded again.

    :raises CodecError: if the payload holds types msgpack cannot carry
    """
    if payload is None:
        return _NIL
    try:
        return msgspec.Raw(_encoder.encode(payload))
    except (TypeError, msgspec.EncodeError) as exc:
        raise CodecError(f"payload cannot be encoded: {exc}") from exc


def decode_payload(raw: msgspec.Raw | bytes, type: type[T] | UnionType | None = None
                   ) -> T | Any:
    """Decode a user payload, optionally validating it into ``type``.

    :raises CodecError: if the bytes are not msgpack or do not match ``type``
    """
    try:
        if type is None:
            return _any_decoder.decode(raw)
        return msgspec.msgpack.decode(raw, type=type)
    except msgspec.DecodeError as exc:
        raise CodecError(f"payload cannot be decoded: {exc}") from exc


def _field(fields: dict[bytes, bytes] | None) -> bytes:
    if not fields:
        raise CodecError("entry has no fields (deleted or empty)")
    data = fields.get(FIELD)
    if data is None:
        names = ", ".join(repr(k) for k in list(fields)[:5])
        raise CodecError(f"entry has no {FIELD!r} field (fields: {names})")
    return data


def decode_envelope(fields: dict[bytes, bytes] | None) -> Envelope:
    """Decode the envelope of a stream entry.

    :raises CodecError: if the entry is not a well-formed envelope (a poison entry)
    """
    data = _field(fields)
    try:
        return _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CodecError(f"entry is not an envelope: {exc}") from exc


def decode_reply(fields: dict[bytes, bytes] | None) -> Reply:
    """Decode a reply entry.

    :raises CodecError: if the entry is not a well-formed reply
    """
    data = _field(fields)
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CodecError(f"entry is not a reply: {exc}") from exc


def decode_node(data: bytes) -> NodeInfo:
    """Decode a node heartbeat record.

    :raises CodecError: if the bytes are not a node record
    """
    try:
        return _node_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CodecError(f"not a node record: {exc}") from exc


def encode_event(event: AgentEvent | EventBatch) -> bytes:
    """Encode a lifecycle event or a batch of them.

    :raises CodecError: if event data holds types msgpack cannot carry
    """
    try:
        return _encoder.encode(event)
    except (TypeError, msgspec.EncodeError) as exc:
        raise CodecError(f"event cannot be encoded: {exc}") from exc


#: Encode one event of a batch from the fields of a ``PackedEvent``, in order (a tuple
#: encodes as the array that struct is, for a fraction of the cost of building one). The
#: encoder's own method, called twice per handled message: it raises one of
#: :data:`ENCODE_ERRORS` when event data holds types msgpack cannot carry.
encode_packed_event: Callable[[tuple[Any, ...]], bytes] = _encoder.encode
#: What msgspec raises for a value it cannot encode.
ENCODE_ERRORS = (TypeError, msgspec.EncodeError)


def encode_event_batch(batch_id: str, packed_events: Sequence[bytes]) -> bytes:
    """The ``EventBatch`` of events encoded by :func:`encode_packed_event`, joined as they
    are: the batch without its events, whose last field (an empty array) is replaced by the
    array of them."""
    empty = _encoder.encode(EventBatch(id=batch_id))
    n = len(packed_events)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return b"".join((empty[:-1], header, *packed_events))


def decode_event(fields: dict[bytes, bytes] | None) -> AgentEvent | EventBatch:
    """Decode an entry of the events stream: one event, or a batch of them.

    :raises CodecError: if the entry is neither
    """
    data = _field(fields)
    try:
        decoded: AgentEvent | EventBatch = _event_decoder.decode(data)
        return decoded
    except msgspec.DecodeError as exc:
        raise CodecError(f"entry is not an event: {exc}") from exc
