"""How big a message the bus takes, and what happens to a request that would be bigger. Plain logic, no I/O.

nats-server refuses a message over its `max_payload` (headers included) and closes the connection of the
client that sent it; nats-py refuses one locally (MaxPayloadError) when the payload alone is over. The services
read the server's value from its INFO (Bus.max_payload) and keep ENVELOPE_ROOM of it for what the next hops
add around an item (the batcher's BatchRequest, the worker's ReplyBatch, headers), so an item that leaves the
gateway whole can travel whole to the worker and back. A request over that is refused before it is published
with PayloadTooLarge (HTTP 413, gRPC RESOURCE_EXHAUSTED) naming the limit; never UNAVAILABLE: sending it again
would fail again.

Several items that travel together (an ItemBundle, a batch, a ReplyBatch) are cut into messages that each fit
(`chunks`): an item near the limit goes alone and the others are not failed with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from unimodel.core import errors
from unimodel.v1 import inference_pb2

ENVELOPE_ROOM = 64 * 1024
"""Bytes of the bus's max_payload kept for headers and the envelope around an item (BatchRequest fields, reply
subjects, trace context, a ReplyBatch entry, the path of instance ids): a few hundred bytes each in practice."""

ALONE_BYTES = 1024 * 1024
"""An item or answer of this many bytes or more travels alone, never in a bundle or ReplyBatch: sharing a
message saves per-message costs, which are nothing next to its size, and packing and unpacking copy it twice
more (on the event loop of the gateway, whose /health/live and small requests wait meanwhile)."""

BLOB_BYTES = 4 * 1024 * 1024
"""An item or answer of this many bytes or more travels by reference (core/blobs.py): held by its sender and
fetched in chunks by its receiver. Nobody in between handles its bytes, and no process copies them in one piece
on its event loop as part of a bus message (nats-py joins a message into one buffer to send it and copies it
twice to receive it: for 60 MB, 20-60 ms each on a small host, during which that service answers nobody)."""

BLOB_CHUNK_BYTES = 256 * 1024
"""The most bytes one fetch of a held payload returns (one bus message): a fraction of a millisecond of copying per
step, so the event loops that pass the pieces interleave other requests finely (1 MiB pieces left small predicts
at ~5x their p99 with 60 MB in flight, 256 KiB at ~3.3x: docs/benchmarks.md)."""

PER_ITEM = 16
"""Bytes an item adds in a repeated field of a bundle or batch besides itself: its tag and length varint (at most
11) and the queue time the batcher sends along (at most 11 more bytes, packed)."""


def message_limit(max_payload: int) -> int:
    """The largest encoded item (or bundle, batch, reply) the services publish under `max_payload`."""
    return max(max_payload - ENVELOPE_ROOM, max_payload // 2)


def mib(n: int) -> str:
    """Bytes as MiB for a message: 67108864 -> '64 MiB', 1500000 -> '1.4 MiB'."""
    value = n / (1024 * 1024)
    return f"{value:.0f} MiB" if value.is_integer() else f"{value:.1f} MiB"


def too_large(size: int, max_payload: int, what: str = "the request") -> errors.PayloadTooLarge:
    """PayloadTooLarge for `what`, `size` bytes once encoded, naming the limit in bytes and MiB."""
    limit = message_limit(max_payload)
    return errors.PayloadTooLarge(
        f"{what} is {size} bytes once encoded for the message bus, over its limit of {limit} bytes ({mib(limit)}; "
        f"NATS max_payload {max_payload} bytes less {ENVELOPE_ROOM} for the envelope): send less per request",
        limit=str(limit),
        size=str(size),
    )


def check(size: int, max_payload: int, what: str = "the request") -> None:
    """Raise too_large when `size` encoded bytes do not fit under `max_payload`."""
    if size > message_limit(max_payload):
        raise too_large(size, max_payload, what)


def chunks(sizes: Sequence[int], limit: int, alone: int | None = None) -> list[list[int]]:
    """The indices of items of the given encoded sizes, in order, cut into runs whose sizes (each plus
    PER_ITEM) add up to at most `limit`: one run when all fit, and an item too big to share a message
    alone in its own run (whoever sends it finds it too large). With `alone`, items of that size or more
    get a run of their own too."""
    runs: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if alone is not None and size >= alone:
            if current:
                runs.append(current)
                current, total = [], 0
            runs.append([index])
            continue
        size += PER_ITEM
        if current and total + size > limit:
            runs.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        runs.append(current)
    return runs


def reply_batches(batch: inference_pb2.ReplyBatch, limit: int) -> list[bytes]:
    """`batch` encoded as one ReplyBatch, or as several that each fit `limit` when it does not."""
    if batch.ByteSize() <= limit:
        return [batch.SerializeToString()]
    replies = list(batch.replies)
    return [
        inference_pb2.ReplyBatch(replies=[replies[i] for i in run]).SerializeToString()
        for run in chunks([r.ByteSize() for r in replies], limit)
    ]
