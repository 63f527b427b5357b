"""Protobuf wire-level assembly of what the batcher sends, so queued items are never re-encoded.

Protobuf messages concatenate: appending an encoded field to a message's bytes sets that field (the
last value of a singular field wins), and a repeated message field is each element's bytes behind a
tag and a length. So the batcher keeps each BatchItem as the bytes it received plus its own fields,
and a BatchRequest is those bytes joined. The unit tests check the result against the generated code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from unimodel.core.protowire import varint

# tag bytes: (field number << 3) | wire type (0 varint, 2 length-delimited)
_ITEM_REQUEST_ID = b"\x0a"  # BatchItem.request_id = 1
_ITEM_DEADLINE = b"\x18"  # BatchItem.deadline_unix_ms = 3
_ITEM_REPLY_TO = b"\x2a"  # BatchItem.reply_to = 5
_ITEM_TRACE = b"\x32"  # BatchItem.trace_context = 6 (map entries: key = 1, value = 2)
_MAP_KEY, _MAP_VALUE = b"\x0a", b"\x12"
_BATCH_ID = b"\x0a"  # BatchRequest.batch_id = 1
_BATCH_MODEL = b"\x12"  # BatchRequest.model = 2
_BATCH_ITEM = b"\x1a"  # BatchRequest.items = 3
_BATCH_PATH = b"\x22"  # BatchRequest.path = 4
_BATCH_QUEUE_NS = b"\x2a"  # BatchRequest.queue_ns = 5 (packed varints)


def item_fields(
    reply_to: str = "", deadline_unix_ms: int = 0, request_id: str = "", trace_context: Mapping[str, str] | None = None
) -> bytes:
    """Encoded BatchItem fields to append to an item's bytes (each one only when non-empty)."""
    out = b""
    if reply_to:
        out += _string(_ITEM_REPLY_TO, reply_to.encode())
    if deadline_unix_ms > 0:
        out += _ITEM_DEADLINE + varint(deadline_unix_ms)
    if request_id:
        out += _string(_ITEM_REQUEST_ID, request_id.encode())
    if trace_context:
        for key, value in trace_context.items():
            out += _string(_ITEM_TRACE, _string(_MAP_KEY, key.encode()) + _string(_MAP_VALUE, value.encode()))
    return out


def _string(tag: bytes, value: bytes) -> bytes:
    return tag + varint(len(value)) + value


def batch_request(
    batch_id: str, model: str, path: Iterable[str], items: Iterable[bytes], queue_ns: Iterable[int] = ()
) -> bytes:
    """An encoded BatchRequest whose items are the given encoded BatchItems (and their queue times)."""
    parts = [_string(_BATCH_ID, batch_id.encode()), _string(_BATCH_MODEL, model.encode())]
    for hop in path:
        parts.append(_string(_BATCH_PATH, hop.encode()))
    for item in items:
        parts.append(_BATCH_ITEM)
        parts.append(varint(len(item)))
        parts.append(item)
    packed = b"".join(varint(max(0, int(ns))) for ns in queue_ns)
    if packed:
        parts.append(_string(_BATCH_QUEUE_NS, packed))
    return b"".join(parts)
