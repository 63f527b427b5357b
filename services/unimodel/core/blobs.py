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

Same host: even in 256 KiB chunks, moving 60 MB through NATS costs each Python process on the way about a second
of event-loop CPU (nats-py builds, writes, reads and copies every chunk), and every request those loops serve
meanwhile waits (docs/benchmarks.md). So with `same_host` (setting `same_host_blobs`, on by default) the owner
writes the payload once, in a thread that lets go of the GIL, into an anonymous memory file (memfd_create) and
the reference names it as `/proc/<owner pid>/fd/<fd>`. A receiver on the same host and in the same PID namespace
(the local cluster, pods sharing a process namespace, containers run with `--pid host`) opens that path, checks
it is the payload's file (its name carries the subject's random part; size), maps it (in a thread) and tells the
owner it is done with one empty message; it never copies the payload on its event loop. Anyone else (another
host, another PID namespace, a file gone meanwhile) fetches the chunks as above, which the owner then serves
from the same file. As Ray's object store does for objects on one node, and Triton's system shared memory for
its clients, without a region to register: the file lives exactly as long as the payload is held (the owner
closes it on release, and the kernel when the owner dies; a reader's mapping keeps it until unmapped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from unimodel.core import errors, payload_limits, subjects
from unimodel.core.bulk_threads import BulkPool, write_all
from unimodel.core.bus import CONNECTION_ERRORS, Bus, error_from_headers
from unimodel.v1 import inference_pb2

log = logging.getLogger("unimodel.blobs")

_RANGE = struct.Struct("<QI")  # a fetch: offset (u64), length (u32), little-endian
FETCH_WINDOW = 4
"""Chunk requests in flight per fetch: enough to keep the owner and NATS busy, few enough that a fetch never
has more than a few MiB in transit."""


LOCAL_NAME = "unimodel-blob-"
"""Name of a payload's memory file: this, then the random part of its subject (what a receiver checks)."""
_LOCAL_PATH = re.compile(r"/proc/[0-9]+/fd/[0-9]+")
T = TypeVar("T")
Payload = bytearray | memoryview
"""A fetched payload: a buffer filled from chunks, or a read-only view of the owner's memory file."""

_io = BulkPool("unimodel-blobs")
"""Writing, mapping and freeing memory files: system calls that let go of the GIL (10-40 ms each for 60 MB),
none of them on an event loop."""
_submit = _io.submit


def _memory_file(token: str, views: list[memoryview]) -> int:
    """A new memory file named LOCAL_NAME + token holding the concatenation of `views`: its fd."""
    fd = os.memfd_create(LOCAL_NAME + token, os.MFD_CLOEXEC)
    try:
        for view in views:
            write_all(fd, view)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_soon(fd: int) -> None:
    """Close a held payload's memory file in this module's threads (freeing its pages takes milliseconds)."""
    try:
        _submit(os.close, fd)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        os.close(fd)


def _open_local(ref: inference_pb2.BlobRef) -> int | None:
    """An fd of the owner's memory file that `ref.local` names, or None when it cannot be opened from here or
    is not the payload's (another host or PID namespace, released)."""
    if not _LOCAL_PATH.fullmatch(ref.local):
        return None
    expected = f"/memfd:{LOCAL_NAME}{ref.subject.rpartition('.')[2]} (deleted)"
    try:
        fd = os.open(ref.local, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # checked on the file opened (not the path before opening it: its fd number may be reused meanwhile)
        if os.readlink(f"/proc/self/fd/{fd}") == expected and os.fstat(fd).st_size == ref.size:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def can_open(ref: inference_pb2.BlobRef) -> bool:
    """Whether this process can map `ref`'s memory file now (a few system calls)."""
    fd = _open_local(ref) if ref.local else None
    if fd is None:
        return False
    os.close(fd)
    return True


def map_local(ref: inference_pb2.BlobRef) -> memoryview | None:
    """The payload of `ref` mapped from its owner's memory file (read-only, faulted in here: call it in a thread
    or a helper process), or None when that file cannot be opened from here or is not the payload's."""
    fd = _open_local(ref)
    if fd is None:
        return None
    try:
        if ref.size == 0:  # mmap refuses empty files
            return memoryview(b"")
        mapped = mmap.mmap(fd, ref.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(fd)  # the mapping keeps the file
    return memoryview(mapped)


async def done(bus: Bus, ref: inference_pb2.BlobRef) -> None:
    """Tell the owner of `ref` that it was read from its memory file (a payload read once is let go)."""
    with contextlib.suppress(*CONNECTION_ERRORS):  # else the owner lets go at its deadline
        await bus.client().publish(ref.subject, b"")


def gone(what: str) -> errors.Unavailable:
    return errors.Unavailable(f"{what} held by another service is no longer available (that service stopped or the request ended)", retry_after_s=1)


@dataclass(slots=True)
class _Held:
    parts: list[memoryview]  # the payload is their concatenation (none when it is in the memory file `fd`)
    size: int
    once: bool
    fd: int = -1
    served: int = 0
    timer: asyncio.TimerHandle | None = None

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes offset..offset+length (cut at the end), without copying when they lie in one part."""
        if self.fd >= 0:
            return os.pread(self.fd, min(length, max(self.size - offset, 0)), offset)
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

    def __init__(self, bus: Bus, instance_id: str, *, same_host: bool = True) -> None:
        self.bus = bus
        self.same_host = same_host and hasattr(os, "memfd_create")  # Linux
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
    async def hold(self, *parts: bytes | bytearray | memoryview, ttl_s: float, once: bool = False) -> inference_pb2.BlobRef:
        """Serve the concatenation of `parts` (not joined: they must not change while this runs, nor while held
        when not `same_host`) until `release`, for at most `ttl_s` seconds, and with `once` until it was read
        (all its bytes, or mapped from the memory file `same_host` puts it in; `parts` are let go then)."""
        token = os.urandom(16).hex()
        subject = f"{self.prefix}.{token}"
        views = [memoryview(p).cast("B") for p in parts]
        held = _Held(views, sum(v.nbytes for v in views), once)
        if self.same_host:
            future = _submit(_memory_file, token, views)
            try:
                held.fd = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else _close_soon(f.result()))
                raise
            except OSError as exc:  # no room for it (a memory limit): served from `parts` instead
                log.debug("payload not put in a memory file: %s", exc)
            else:
                held.parts = []
        held.timer = asyncio.get_running_loop().call_later(max(ttl_s, 0.0), self.release, subject)
        self._held[subject] = held
        ref = inference_pb2.BlobRef(subject=subject, size=held.size)
        if held.fd >= 0:
            ref.local = f"/proc/{os.getpid()}/fd/{held.fd}"
        return ref

    def release(self, subject: str) -> None:
        held = self._held.pop(subject, None)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        if held.fd >= 0:
            fd, held.fd = held.fd, -1
            _close_soon(fd)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:  # a receiver mapped the memory file ("done"): a payload read once is let go
            held = self._held.get(msg.subject)
            if not msg.data and held is not None and held.once:
                self.release(msg.subject)
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
    """The headers of an answer held by reference (its body is empty): "<subject> <size>[ <local>]"."""
    return {subjects.Header.BLOB: f"{ref.subject} {ref.size} {ref.local}".rstrip()}


def answer_ref(value: str) -> inference_pb2.BlobRef:
    """The BlobRef of an answer's Um-Blob header; INTERNAL when malformed."""
    subject, _, rest = value.partition(" ")
    size, _, local = rest.partition(" ")
    if not subject or not size.isdigit():
        raise errors.Internal(f"malformed {subjects.Header.BLOB} header on an answer")
    return inference_pb2.BlobRef(subject=subject, size=int(size), local=local)


async def fetch(
    bus: Bus, ref: inference_pb2.BlobRef, *, timeout_s: float, what: str = "the payload", same_host: bool = True
) -> Payload:
    """The bytes `ref` names: with `same_host`, mapped from the owner's memory file when it can be opened from
    here, else read in chunks into one buffer. UNAVAILABLE (saying so) when the owner or the payload is gone, a
    chunk does not come within `timeout_s`, or NATS is down."""
    size = ref.size
    if not ref.subject.startswith(f"{subjects.ROOT}.blob."):
        raise errors.InvalidArgument(f"not a payload reference: {ref.subject!r}")
    payload_limits.check(size, bus.max_payload, what)  # the limit a payload sent whole has
    if same_host and ref.local:
        mapped = await asyncio.wrap_future(_submit(map_local, ref))
        if mapped is not None:
            await done(bus, ref)
            return mapped
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
