"""What the batcher sends, built by the generated code around the bytes it received: queued items are
never decoded and re-encoded.

Protobuf messages concatenate: appending an encoded BatchItem to an item's bytes merges its fields in
(the last value of a singular field wins). So the batcher keeps each item as the bytes it received plus
an encoded BatchItem of the fields it fills in, and sends a batch as an EncodedBatchRequest
(inference.proto), BatchRequest's wire-compatible mirror whose items are those bytes. The unit tests
check the results against BatchItem and BatchRequest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from unimodel.core.protowire import varint
from unimodel.v1.inference_pb2 import BatchItem, EncodedBatchRequest, ItemBundle

UNDECODABLE = (
    "the request could not be decoded: it is malformed, or nests deeper than the protobuf runtime decodes "
    "(100 levels of messages)"
)


def decode_item(data: bytes) -> BatchItem:
    """An encoded BatchItem, decoded one message level deeper than it arrived: as router and worker will
    decode it, inside a BatchRequest. So an item too deep for them fails here, where its caller is answered.
    Raises DecodeError."""
    item = ItemBundle.FromString(b"\x0a" + varint(len(data)) + data).items[0]
    return cast(BatchItem, item)  # protobuf's runtime ships no type information


_REPLY_TO = 5  # BatchItem.reply_to's field number


def reply_to_of(data: bytes) -> str:
    """BatchItem.reply_to read from the encoded item's top-level fields, nothing else decoded: where to
    answer an item that does not decode. '' when absent or unreadable."""
    found, pos, end = "", 0, len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            kind = key & 7
            if kind == 0:
                _, pos = _varint(data, pos)
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            elif kind == 2:
                size, pos = _varint(data, pos)
                if key >> 3 == _REPLY_TO and pos + size <= end:
                    found = data[pos : pos + size].decode("utf-8", "replace")  # the last one wins, as in protobuf
                pos += size
            else:
                return found
    except IndexError:
        pass
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise IndexError("varint longer than 10 bytes")


def item_fields(
    reply_to: str = "", deadline_unix_ms: int = 0, request_id: str = "", trace_context: Mapping[str, str] | None = None
) -> bytes:
    """Encoded BatchItem fields to append to an item's bytes (each one only when set; a deadline only
    when positive)."""
    if not (reply_to or deadline_unix_ms > 0 or request_id or trace_context):
        return b""  # the usual case: the gateway set them all
    encoded = BatchItem(
        reply_to=reply_to, deadline_unix_ms=max(deadline_unix_ms, 0), request_id=request_id, trace_context=trace_context
    ).SerializeToString()
    return cast(bytes, encoded)  # protobuf's runtime ships no type information


def batch_request(
    batch_id: str, model: str, path: Iterable[str], items: Iterable[bytes], queue_ns: Iterable[int] = ()
) -> bytes:
    """An encoded BatchRequest whose items are the given encoded BatchItems (and their queue times)."""
    encoded = EncodedBatchRequest(
        batch_id=batch_id, model=model, items=items, path=path, queue_ns=[max(0, int(ns)) for ns in queue_ns]
    ).SerializeToString()
    return cast(bytes, encoded)  # protobuf's runtime ships no type information
