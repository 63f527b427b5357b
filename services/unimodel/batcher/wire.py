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

from unimodel.v1.inference_pb2 import BatchItem, EncodedBatchRequest


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
