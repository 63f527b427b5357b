"""ReplyMux: answers one by one (with error headers, no responders) and in ReplyBatch messages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import pytest
from google.protobuf.message import DecodeError

from unimodel.core import errors, payload_limits
from unimodel.core.context import RequestContext
from unimodel.core.replies import ReplyMux
from unimodel.core.subjects import Header
from unimodel.v1 import inference_pb2


@dataclass
class FakeMsg:
    subject: str
    data: bytes = b""
    headers: dict[str, str] | None = None


@dataclass
class FakeNats:
    published: list[tuple[str, bytes, str, Any]] = field(default_factory=list)
    max_payload: int = 64 * 1024 * 1024  # the server's, as nats-py reads it from INFO

    async def publish(self, subject: str, payload: bytes, reply: str = "", headers: Any = None) -> None:
        if len(payload) > self.max_payload:  # as nats-py does
            raise nats.errors.MaxPayloadError
        self.published.append((subject, payload, reply, headers))


class FakeBus:
    def __init__(self) -> None:
        self.nc = FakeNats()
        self.max_payload = self.nc.max_payload  # the server's (core.bus.Bus.max_payload)
        self.subscribed: list[str] = []

    def client(self) -> FakeNats:
        return self.nc

    @property
    def message_limit(self) -> int:
        return payload_limits.message_limit(self.max_payload)

    async def subscribe(self, subject: str, cb: Any) -> object:
        self.subscribed.append(subject)
        return object()


async def _sent(bus: FakeBus, n: int) -> list[inference_pb2.BatchItem]:
    for _ in range(100):
        if len(bus.nc.published) >= n:
            break
        await asyncio.sleep(0.001)
    return [inference_pb2.BatchItem.FromString(p[1]) for p in bus.nc.published]


async def test_items_carry_inbox_group_id_and_deadline_and_batches_answer_many() -> None:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    await mux.start()
    assert bus.subscribed == ["unimodel.v1.reply.gw-1.*"]
    ctx = RequestContext.new(5, request_id="r1")
    calls = [
        asyncio.create_task(mux.request_item("unimodel.v1.batch.m", inference_pb2.BatchItem(rows=1), ctx, timeout_s=5))
        for _ in range(3)
    ]
    items = await _sent(bus, 3)
    assert [p[2] for p in bus.nc.published] == [i.reply_to for i in items]  # inbox = NATS reply subject
    assert len({i.reply_to for i in items}) == 3
    assert all(i.reply_group == "unimodel.v1.reply.gw-1.batch" for i in items)
    assert all(i.request_id == "r1" and i.deadline_unix_ms == ctx.deadline_ms for i in items)
    assert all(p[3] is None for p in bus.nc.published)  # no trace: no headers

    batch = inference_pb2.ReplyBatch()
    batch.replies.add(reply_to=items[0].reply_to, response=b"zero")
    batch.replies.add(reply_to=items[2].reply_to, error=errors.ResourceExhausted("full", retry_after_s=2).to_proto())
    batch.replies.add(reply_to="unimodel.v1.reply.gw-1.999", response=b"nobody waits")  # dropped
    await mux._on_message(FakeMsg(mux.group, batch.SerializeToString()))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await mux._on_message(FakeMsg(items[1].reply_to, b"one"))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == [b"zero", b"one"]
    assert isinstance(results[2], errors.ResourceExhausted) and results[2].retry_after_s == 2
    assert mux.pending == 0


async def test_error_headers_no_responders_and_timeouts() -> None:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    ctx = RequestContext.new(5)
    first = asyncio.create_task(mux.request_item("s.a", inference_pb2.BatchItem(), ctx, timeout_s=5))
    second = asyncio.create_task(mux.request_item("s.b", inference_pb2.BatchItem(), ctx, timeout_s=5))
    a, b = await _sent(bus, 2)
    await mux._on_message(FakeMsg(a.reply_to, headers={"Status": "503"}))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await mux._on_message(
        FakeMsg(b.reply_to, headers={Header.ERROR_CODE: "NOT_FOUND", Header.ERROR_MESSAGE: "no model"})  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    )
    with pytest.raises(errors.Unavailable, match="no instance is serving s.a"):
        await first
    with pytest.raises(errors.NotFound, match="no model"):
        await second
    with pytest.raises(errors.Unavailable, match="no reply on s.c in time"):
        await mux.request_item("s.c", inference_pb2.BatchItem(), ctx, timeout_s=0.05)
    with pytest.raises(errors.DeadlineExceeded):
        await mux.request_item("s.d", inference_pb2.BatchItem(), RequestContext.new(0.05), timeout_s=5)
    await mux._on_message(FakeMsg(mux.group, b"\xff\xff"))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers); not a ReplyBatch: dropped
    assert mux.pending == 0


async def test_requests_of_one_iteration_leave_as_one_bundle() -> None:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    ctx = RequestContext.new(5)

    def call(rows: int) -> asyncio.Task[bytes]:
        return asyncio.create_task(
            mux.request_item("b.m", inference_pb2.BatchItem(rows=rows), ctx, timeout_s=5, bundle_subject="u.m")
        )

    calls = [call(r) for r in (1, 2, 3)]
    for _ in range(5):
        await asyncio.sleep(0)
    ((subject, payload, reply, headers),) = bus.nc.published
    bundle = inference_pb2.ItemBundle.FromString(payload)
    assert subject == "u.m" and [i.rows for i in bundle.items] == [1, 2, 3] and headers is None
    assert reply == bundle.items[0].reply_to  # "no responders" reaches the first request's inbox
    assert [i.SerializeToString() for i in bundle.items] == inference_pb2.EncodedItemBundle.FromString(payload).items
    # no batcher: NATS answers the bundle's reply subject with status 503, which fails all three
    await mux._on_message(FakeMsg(reply, headers={"Status": "503"}))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    for task in calls:
        with pytest.raises(errors.Unavailable, match="no instance is serving b.m"):
            await task

    alone = call(4)  # alone in its iteration: a plain BatchItem on the batch subject
    for _ in range(5):
        await asyncio.sleep(0)
    subject, payload, reply, _ = bus.nc.published[-1]
    assert subject == "b.m" and inference_pb2.BatchItem.FromString(payload).reply_to == reply
    await mux._on_message(FakeMsg(reply, b"ok"))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    assert await alone == b"ok" and mux.pending == 0


def test_encoded_bundles_are_item_bundles_and_bad_bytes_are_refused() -> None:
    items = [inference_pb2.BatchItem(request_id=f"r{i}", reply_to=f"x.{i}") for i in range(3)]
    big = inference_pb2.BatchItem(request_id="big")  # a length of three varint bytes
    big.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 50000], contents=b"\x00" * 200_000)
    items.append(big)
    encoded = [i.SerializeToString() for i in items]
    raw = inference_pb2.EncodedItemBundle(items=encoded).SerializeToString()
    assert raw == inference_pb2.ItemBundle(items=items).SerializeToString()
    assert inference_pb2.ItemBundle.FromString(raw) == inference_pb2.ItemBundle(items=items)
    assert inference_pb2.EncodedItemBundle.FromString(raw).items == encoded
    assert inference_pb2.EncodedItemBundle.FromString(b"").items == []
    for bad in (b"\x0a\x05ab", b"\x0a\xff", b"\x0f"):  # truncated item, truncated length, invalid wire type
        with pytest.raises(DecodeError):
            inference_pb2.EncodedItemBundle.FromString(bad)


async def test_inboxes_end_in_128_random_bits_and_unknown_inboxes_are_dropped() -> None:
    """An inbox is the capability to answer a request (docs/security.md): not a counter a NATS user that may
    publish into every reply tree could guess."""
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus
    await mux.start()
    tasks = [asyncio.create_task(mux.request_item("s", inference_pb2.BatchItem(), RequestContext.new(5), timeout_s=5)) for _ in range(3)]
    items = await _sent(bus, 3)
    tokens = [item.reply_to.removeprefix("unimodel.v1.reply.gw-1.") for item in items]
    assert len(set(tokens)) == 3 and all(len(t) == 32 and int(t, 16) >= 0 for t in tokens), tokens
    # a guessed inbox, and a ReplyBatch naming one, reach nobody; the real requests still wait for theirs
    await mux._on_message(FakeMsg("unimodel.v1.reply.gw-1.1", b"forged"))  # type: ignore[arg-type]
    forged = inference_pb2.ReplyBatch(replies=[inference_pb2.ItemReply(reply_to="unimodel.v1.reply.gw-1.2", response=b"x")])
    await mux._on_message(FakeMsg(mux.group, forged.SerializeToString()))  # type: ignore[arg-type]
    assert not any(t.done() for t in tasks)
    await mux._on_message(FakeMsg(items[0].reply_to, b"answer"))  # type: ignore[arg-type]
    assert await tasks[0] == b"answer"
    for t in tasks[1:]:
        t.cancel()


async def test_an_item_over_the_bus_limit_is_413_naming_it_and_never_sent() -> None:
    bus = FakeBus()
    bus.max_payload = 200_000
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    ctx = RequestContext.new(5)
    big = inference_pb2.BatchItem(rows=1)
    big.input.string_value = "x" * 150_000  # over 200 000 less the envelope room
    for bundle_subject in ("u.m", ""):
        with pytest.raises(errors.PayloadTooLarge, match=f"limit of {payload_limits.message_limit(200_000)} bytes"):
            await mux.request_item("b.m", big, ctx, timeout_s=5, bundle_subject=bundle_subject)
    with pytest.raises(errors.PayloadTooLarge):
        await mux.open_stream("b.m", big, ctx)
    assert bus.nc.published == [] and mux.pending == 0


async def test_items_that_fit_alone_but_not_together_leave_in_several_bundles() -> None:
    bus = FakeBus()
    bus.max_payload = 200_000  # message limit 134 464
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    ctx = RequestContext.new(5)

    def call(size: int) -> asyncio.Task[bytes]:
        item = inference_pb2.BatchItem(rows=1)
        item.input.string_value = "x" * size
        return asyncio.create_task(mux.request_item("b.m", item, ctx, timeout_s=5, bundle_subject="u.m"))

    calls = [call(n) for n in (10, 70_000, 70_000, 10)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert all(len(payload) <= bus.message_limit for _s, payload, _r, _h in bus.nc.published)
    sizes = []
    for subject, payload, _reply, _headers in bus.nc.published:
        if subject == "u.m":
            sizes += [len(i.input.string_value) for i in inference_pb2.ItemBundle.FromString(payload).items]
        else:
            sizes.append(len(inference_pb2.BatchItem.FromString(payload).input.string_value))
    assert sizes == [10, 70_000, 70_000, 10] and len(bus.nc.published) == 2
    for task in calls:
        task.cancel()


async def test_a_refused_payload_is_413_never_connection_down() -> None:
    """nats-py's MaxPayloadError (the server's limit is lower than we knew) is not a 503 with Retry-After."""
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    ctx = RequestContext.new(5)

    async def refuse(*_args: Any, **_kw: Any) -> None:
        raise nats.errors.MaxPayloadError

    bus.nc.publish = refuse  # type: ignore[method-assign]  # as if the server took less than its INFO said
    item = inference_pb2.BatchItem(rows=1)
    for bundle_subject in ("u.m", ""):
        with pytest.raises(errors.PayloadTooLarge) as caught:
            await mux.request_item("b.m", item, ctx, timeout_s=5, bundle_subject=bundle_subject)
        assert caught.value.http_status == 413 and not caught.value.retry_after_s
