"""Big payloads travel by reference, in chunks: held by their sender, fetched by their receiver.

A 60 MB item sent as one NATS message is copied whole, in single C calls that hold the GIL, by every Python
process it passes: nats-py joins it into one buffer to publish it and copies it twice to parse it; the batcher
splits and rebuilds its bundle. Each copy stops that process's event loop for tens of milliseconds, and every
other request it serves waits (docs/benchmarks.md, "Big requests in flight"). So an item or answer of
payload_limits.BLOB_BYTES or more is *held* by the process that made it (`Blobs.hold`: no copy, the bytes
stay where they are) and only a BlobRef travels: `<blobs(owner)>.<128 random bits>` and the size. The one
process that needs the bytes fetches them (`Blobs.fetch`) as requests for ranges of at most
payload_limits.BLOB_CHUNK_BYTES, a few in flight at once, copied into one preallocated buffer: no step
copies more than a chunk. The batcher only ever sees the reference.

The owner answers range requests on one plain subscription (it keeps answering while the service drains)
until the payload is released: by its owner when the request ends (a gateway's item: a retried batch fetches
it again), after its last byte was read once (`once`: a worker's answer, read by one gateway), or when its
time is up. A payload that is gone answers NOT_FOUND; an owner that is gone, "no responders": either way the
fetch fails at once with UNAVAILABLE saying so, and the request fails or is retried like any request whose
process died (issue 16's lost-work rules), never waiting for its deadline.

The subject is the capability to read the payload, as an answer inbox is the capability to answer: only the
services on the request's path see it (core/subjects.py, permissions).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from unimodel.core import errors, payload_limits, subjects
from unimodel.core.bus import CONNECTION_ERRORS, Bus, error_from_headers
from unimodel.v1 import inference_pb2

log = logging.getLogger("unimodel.blobs")

_RANGE = struct.Struct("<QI")  # a fetch: offset (u64), length (u32), little-endian
FETCH_WINDOW = 4
"""Chunk requests in flight per fetch: enough to keep the owner and NATS busy, few enough that a fetch never
has more than a few MiB in transit."""


def gone(what: str) -> errors.Unavailable:
    return errors.Unavailable(f"{what} held by another service is no longer available (that service stopped or the request ended)", retry_after_s=1)


@dataclass(slots=True)
class _Held:
    parts: list[memoryview]  # the payload is their concatenation
    size: int
    once: bool
    served: int = 0
    timer: asyncio.TimerHandle | None = None

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes offset..offset+length (cut at the end), without copying when they lie in one part."""
        pieces: list[memoryview] = []
        start = 0
        end = offset + length
        for part in self.parts:
            stop = start + part.nbytes
            if stop > offset and start < end:
                pieces.append(part[max(offset - start, 0) : min(end, stop) - start])
            start = stop
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)


def parse_range(data: bytes) -> tuple[int, int]:
    """(offset, length) of a fetch request; InvalidArgument when it is not one."""
    if len(data) != _RANGE.size:
        raise errors.InvalidArgument(f"a blob fetch is {_RANGE.size} bytes (offset u64, length u32), not {len(data)}")
    offset, length = _RANGE.unpack(data)
    return offset, length


def ranges(size: int, chunk: int = payload_limits.BLOB_CHUNK_BYTES) -> list[tuple[int, int]]:
    """The (offset, length) requests that read `size` bytes in chunks of at most `chunk`."""
    return [(offset, min(chunk, size - offset)) for offset in range(0, size, chunk)]


class Blobs:
    """The payloads one instance holds, served on its blob subject, and the fetching of others'."""

    def __init__(self, bus: Bus, instance_id: str) -> None:
        self.bus = bus
        self.prefix = subjects.blobs(instance_id)
        self._held: dict[str, _Held] = {}
        self._sub: Subscription | None = None

    @property
    def held(self) -> int:
        return len(self._held)

    async def start(self) -> None:
        """Subscribe (after the bus connected). A plain subscription: held payloads stay readable while the
        service drains."""
        if self._sub is None:
            self._sub = await self.bus.subscribe(f"{self.prefix}.*", self._on_request)
            await self.bus.client().flush()  # the server has the subscription before anyone is sent a reference

    # owner side ---------------------------------------------------------------------------------------
    def hold(self, *parts: bytes | bytearray | memoryview, ttl_s: float, once: bool = False) -> inference_pb2.BlobRef:
        """Serve the concatenation of `parts` (not copied, nor joined: they must not change while held) until
        `release`, for at most `ttl_s` seconds, and with `once` until its last byte was read."""
        subject = f"{self.prefix}.{os.urandom(16).hex()}"
        views = [memoryview(p).cast("B") for p in parts]
        held = _Held(views, sum(v.nbytes for v in views), once)
        held.timer = asyncio.get_running_loop().call_later(max(ttl_s, 0.0), self.release, subject)
        self._held[subject] = held
        return inference_pb2.BlobRef(subject=subject, size=held.size)

    def release(self, subject: str) -> None:
        held = self._held.pop(subject, None)
        if held is not None and held.timer is not None:
            held.timer.cancel()

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            offset, length = parse_range(msg.data)
            held = self._held.get(msg.subject)
            if held is None:
                raise errors.NotFound("the payload is no longer held here")
            size = held.size
            if offset > size or length > payload_limits.BLOB_CHUNK_BYTES:
                raise errors.InvalidArgument(
                    f"range {offset}+{length} is outside the payload ({size} bytes) or over {payload_limits.BLOB_CHUNK_BYTES} bytes"
                )
            part = held.read(offset, length)
            await self.bus.client().publish(msg.reply, part)  # type: ignore[arg-type]  # nats-py takes any bytes-like (it concatenates): no copy of the whole payload
            held.served += len(part)
            if held.once and held.served >= size:
                self.release(msg.subject)
        except errors.UnimodelError as err:
            await self.bus.publish_error(msg.reply, err)
        except CONNECTION_ERRORS:
            pass  # the fetcher fails at once ("no responders") or at its timeout


def answer_headers(ref: inference_pb2.BlobRef) -> dict[str, str]:
    """The headers of an answer held by reference (its body is empty)."""
    return {subjects.Header.BLOB: f"{ref.subject} {ref.size}"}


def answer_ref(value: str) -> inference_pb2.BlobRef:
    """The BlobRef of an answer's Um-Blob header; INTERNAL when malformed."""
    subject, _, size = value.partition(" ")
    if not subject or not size.isdigit():
        raise errors.Internal(f"malformed {subjects.Header.BLOB} header on an answer")
    return inference_pb2.BlobRef(subject=subject, size=int(size))


async def fetch(bus: Bus, ref: inference_pb2.BlobRef, *, timeout_s: float, what: str = "the payload") -> bytearray:
    """The bytes `ref` names, read in chunks into one buffer. UNAVAILABLE (saying so) when the owner or
    the payload is gone, a chunk does not come within `timeout_s`, or NATS is down."""
    size = ref.size
    if not ref.subject.startswith(f"{subjects.ROOT}.blob."):
        raise errors.InvalidArgument(f"not a payload reference: {ref.subject!r}")
    payload_limits.check(size, bus.max_payload, what)  # the limit a payload sent whole has
    out = bytearray(size)  # zero pages: the kernel maps them as they are written
    view = memoryview(out)
    nc = bus.client()
    deadline = time.monotonic() + timeout_s
    parts = ranges(size)
    pending = iter(parts)

    async def worker() -> None:
        for offset, length in pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.Unavailable(f"{what} could not be read in time from the service holding it", retry_after_s=1)
            try:
                msg = await nc.request(ref.subject, _RANGE.pack(offset, length), timeout=left)
            except nats.errors.NoRespondersError:
                raise gone(what) from None
            except nats.errors.TimeoutError:
                raise errors.Unavailable(f"{what} could not be read in time from the service holding it", retry_after_s=1) from None
            except CONNECTION_ERRORS:
                raise errors.Unavailable("NATS connection is down", retry_after_s=1) from None
            err = error_from_headers(msg.headers)
            if err is not None:
                raise gone(what) if isinstance(err, errors.NotFound) else err
            if len(msg.data) != length:
                raise errors.Internal(f"{what}: asked for {length} bytes at {offset}, got {len(msg.data)}")
            view[offset : offset + length] = msg.data

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(FETCH_WINDOW, len(parts)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return out
