"""Payloads held by reference (core/blobs.py) over a real nats-server: read in chunks or mapped from the owner's
memory file (same host), released, and a gone owner or payload fails the read at once with a clear error."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2
from nats.aio.msg import Msg

from helpers.support import Services
from unimodel.core import blobs, errors, payload_limits, subjects
from unimodel.core.blobs import Blobs
from unimodel.core.bus import Bus
from unimodel.core.context import RequestContext
from unimodel.local.procs import NatsServer, free_port, wait_until
from unimodel.v1 import inference_pb2


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    server = NatsServer(free_port(), tmp_path / "nats")
    server.start_and_wait()
    try:
        yield server.address
    finally:
        server.stop()


async def _pair(url: str, same_host: bool = False) -> tuple[Bus, Blobs, Bus]:
    owner, reader = Bus([url], "owner"), Bus([url], "reader")
    await owner.connect()
    await reader.connect()
    held = Blobs(owner, "owner-1", same_host=same_host)
    await held.start()
    return owner, held, reader


async def _released(held: Blobs) -> None:
    """Wait until `held` holds nothing (a mapped payload read once is let go when the reader's "done" arrives)."""
    for _ in range(200):
        if held.held == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still held: {held.held}")


async def _file_closed(ref: inference_pb2.BlobRef) -> None:
    """Wait until a released payload's memory file can no longer be opened (release closes it in a thread: a
    moment later under load); a payload held in chunks only has nothing to wait for."""
    for _ in range(200):
        if not blobs.can_open(ref):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the released memory file is still open")


# owner in a memory file or not x reader mapping it or not: every pair reads the same bytes
PATHS = [(False, False), (True, False), (True, True)]


@pytest.mark.parametrize(("in_memory_file", "mapped"), PATHS, ids=["chunks", "chunks-from-file", "mapped"])
def test_a_held_payload_is_read_whole_and_released(nats_url: str, in_memory_file: bool, mapped: bool) -> None:
    async def main() -> None:
        owner, held, reader = await _pair(nats_url, same_host=in_memory_file)
        try:
            data = os.urandom(10 * payload_limits.BLOB_CHUNK_BYTES + 12345)
            ref = await held.hold(data, ttl_s=30)
            assert ref.size == len(data) and ref.subject.startswith("unimodel.v1.blob.owner-1.")
            assert bool(ref.local) == in_memory_file
            got = await blobs.fetch(reader, ref, timeout_s=10, same_host=mapped)
            assert isinstance(got, memoryview if mapped else bytearray)  # mapped, or filled from chunks
            assert bytes(got) == data
            got = await blobs.fetch(reader, ref, timeout_s=10, same_host=mapped)  # held until released: a retried batch reads it again
            assert bytes(got) == data
            held.release(ref.subject)
            assert held.held == 0
            await _file_closed(ref)
            with pytest.raises(errors.Unavailable, match="no longer available"):  # the file is closed too
                await blobs.fetch(reader, ref, timeout_s=5, what="the request", same_host=mapped)
            assert bytes(got) == data  # a mapping made before the release keeps its bytes

            once = await held.hold(data[:3 * payload_limits.BLOB_CHUNK_BYTES], ttl_s=30, once=True)
            assert bytes(await blobs.fetch(reader, once, timeout_s=10, same_host=mapped)) == data[:3 * payload_limits.BLOB_CHUNK_BYTES]
            await _released(held)  # read once: released
            head = b"head-of-the-answer"  # held in parts, read as their concatenation (chunks span them)
            parts = await held.hold(head, data, ttl_s=30, once=True)
            assert parts.size == len(head) + len(data)
            assert bytes(await blobs.fetch(reader, parts, timeout_s=10, same_host=mapped)) == head + data
            empty = await held.hold(b"", ttl_s=30)
            assert bytes(await blobs.fetch(reader, empty, timeout_s=5, same_host=mapped)) == b""
        finally:
            await reader.close()
            await owner.close()

    asyncio.run(main())


def test_a_payload_expires_and_a_gone_owner_fails_the_read_at_once(nats_url: str) -> None:
    async def main() -> None:
        owner, held, reader = await _pair(nats_url)
        try:
            ref = await held.hold(b"x" * 1000, ttl_s=0.2)
            await asyncio.sleep(0.5)
            assert held.held == 0
            with pytest.raises(errors.Unavailable, match="the answer held by another service is no longer available"):
                await blobs.fetch(reader, ref, timeout_s=5, what="the answer")
            ref = await held.hold(b"y" * 1000, ttl_s=30)
        finally:
            await owner.close()
        started = time.monotonic()
        try:
            with pytest.raises(errors.Unavailable, match="no longer available"):
                await blobs.fetch(reader, ref, timeout_s=10)
            assert time.monotonic() - started < 2  # "no responders", not the timeout
        finally:
            await reader.close()

    asyncio.run(main())


def test_bad_references_and_ranges_are_refused(nats_url: str) -> None:
    async def main() -> None:
        owner, held, reader = await _pair(nats_url)
        try:
            with pytest.raises(errors.InvalidArgument, match="not a payload reference"):
                await blobs.fetch(reader, inference_pb2.BlobRef(subject="unimodel.v1.reply.x.y", size=10), timeout_s=1)
            with pytest.raises(errors.PayloadTooLarge, match="over its limit"):
                await blobs.fetch(reader, inference_pb2.BlobRef(subject="unimodel.v1.blob.a.b", size=1 << 40), timeout_s=1)
            ref = await held.hold(b"z" * 100, ttl_s=30)
            nc = reader.client()
            msg = await nc.request(ref.subject, b"short", timeout=2)
            assert msg.headers and msg.headers.get("Um-Error-Code") == "INVALID_ARGUMENT"
            msg = await nc.request(ref.subject, blobs._RANGE.pack(0, payload_limits.BLOB_CHUNK_BYTES + 1), timeout=2)
            assert msg.headers and msg.headers.get("Um-Error-Code") == "INVALID_ARGUMENT"
            msg = await nc.request(ref.subject, blobs._RANGE.pack(90, 50), timeout=2)  # the end is cut, as a slice
            assert msg.data == b"z" * 10
        finally:
            await reader.close()
            await owner.close()

    asyncio.run(main())


def test_a_memory_file_that_is_not_the_payloads_is_not_mapped(nats_url: str) -> None:
    """A reference's `local` path is only mapped when it opens the payload's own memory file (its name carries
    the subject's random part, and its size): anything else is read in chunks from the owner."""

    async def main() -> None:
        owner, held, reader = await _pair(nats_url, same_host=True)
        other = os.memfd_create("unimodel-blob-0123456789abcdef0123456789abcdef")  # a payload file, not this one
        try:
            data = os.urandom(payload_limits.BLOB_CHUNK_BYTES + 7)
            os.write(other, data)
            ref = await held.hold(data, ttl_s=30)
            for local in ("/etc/hostname", f"/proc/{os.getpid()}/fd/{other}", "/proc/1/fd/../../self/fd/0", ""):
                forged = inference_pb2.BlobRef(subject=ref.subject, size=ref.size, local=local)
                got = await blobs.fetch(reader, forged, timeout_s=10)
                assert isinstance(got, bytearray) and bytes(got) == data, local
            wrong_size = inference_pb2.BlobRef(subject=ref.subject, size=ref.size - 1, local=ref.local)
            got = await blobs.fetch(reader, wrong_size, timeout_s=10)  # not mapped: the file's size differs
            assert isinstance(got, bytearray) and bytes(got) == data[:-1]
            assert isinstance(await blobs.fetch(reader, ref, timeout_s=10), memoryview)
        finally:
            os.close(other)
            await reader.close()
            await owner.close()

    asyncio.run(main())


def test_a_worker_reads_a_held_item_answers_a_big_answer_by_reference_and_fails_fast_when_the_item_is_gone(
    services: Services,
) -> None:
    """The worker side, driven as the router drives it: a BatchRequest whose item holds only a reference."""
    worker = services.start("gpu-worker", "--instance-id", "worker-b")
    wait_until(lambda: any("worker-b ready" in line for line in worker.lines), 30, "worker ready", worker)
    text = "x" * (6 * 1024 * 1024)  # the answer (echo) is over BLOB_BYTES too

    async def main() -> None:
        bus = Bus([services.infra.nats.url], "test-gateway")
        await bus.connect()
        held = Blobs(bus, "test-gateway")
        await held.start()
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = "unimodel.v1.reply.test-gateway.0123"
        await bus.subscribe(inbox, answers.put)
        try:
            content = inference_pb2.BatchItem(input=struct_pb2.Value(string_value=text), rows=1).SerializeToString()
            ref = await held.hold(content, ttl_s=30)
            deadline = int((time.time() + 20) * 1000)
            item = inference_pb2.BatchItem(blob=ref, reply_to=inbox, request_id="big-1", deadline_unix_ms=deadline)
            batch = inference_pb2.BatchRequest(batch_id="b1", model="echo", items=[item])
            ctx = RequestContext.new(timeout_s=20)
            ack = inference_pb2.BatchAck.FromString(
                await bus.request(subjects.worker_infer("worker-b"), batch.SerializeToString(), ctx, timeout_s=20)
            )
            assert ack.succeeded == 1, ack
            assert held._held[ref.subject].served == 0  # the worker mapped the item's memory file: no piece fetched
            msg = await asyncio.wait_for(answers.get(), 10)
            assert msg.data == b"" and msg.headers is not None
            answer = blobs.answer_ref(msg.headers[subjects.Header.BLOB])
            assert answer.local.startswith("/proc/") and answer.local != f"/proc/{os.getpid()}/fd/"  # the worker's file
            mapped = await blobs.fetch(bus, answer, timeout_s=10, what="the answer")
            assert isinstance(mapped, memoryview)  # same host: mapped from the worker's memory file
            reply = inference_pb2.PredictResponse.FromString(mapped)
            assert reply.output.string_value == text and reply.worker_id == "worker-b"
            for _ in range(50):  # read once: released when the worker gets the "done" (a message after this)
                try:
                    await blobs.fetch(bus, answer, timeout_s=5, what="the answer", same_host=False)
                except errors.Unavailable as exc:
                    assert "no longer available" in exc.message
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the answer is still held after it was read")

            held.release(ref.subject)  # the caller gave up: the worker fails the batch at once, saying why
            await _file_closed(ref)
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="the request held by another service is no longer available"):
                await bus.request(subjects.worker_infer("worker-b"), batch.SerializeToString(), ctx, timeout_s=20)
            assert time.monotonic() - started < 3
        finally:
            await bus.close()

    asyncio.run(main())
