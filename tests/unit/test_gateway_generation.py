"""The gateway's view of one generation: chunk order, repeats, gaps, refusals, aborts (ReplyMux streams)."""

from __future__ import annotations

import asyncio

import pytest
from test_replies import FakeBus, FakeMsg

from unimodel.core import errors
from unimodel.core.bus import error_headers
from unimodel.core.context import RequestContext
from unimodel.core.replies import ReplyMux
from unimodel.gateway.generation_stream import Generation
from unimodel.v1 import generate_pb2, inference_pb2


def chunk(seq: int, text: str = "", finish: str = "", **kw) -> bytes:
    c = generate_pb2.GenerateChunk(seq=seq, text=text, finish_reason=finish, **kw)
    return c.SerializeToString()


async def open_generation(tenant: str = "") -> tuple[FakeBus, ReplyMux, Generation, list[tuple[str, str]], str]:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    await mux.start()
    ctx = RequestContext.new(5, request_id="req-1", tenant=tenant)
    item = inference_pb2.BatchItem(generate=generate_pb2.GenerateRequest(model="m", prompt="hi"))
    stream = await mux.open_stream("unimodel.v1.batch.m", item, ctx)
    aborts: list[tuple[str, str]] = []

    async def abort(ctx: RequestContext, reason: str) -> None:
        aborts.append((ctx.request_id, reason))

    gen = Generation("m", stream, chunk_timeout_s=2, abort=abort)
    return bus, mux, gen, aborts, stream.inbox


async def test_chunks_arrive_in_order_repeats_are_dropped_and_the_item_carries_tenant_and_inbox() -> None:
    bus, mux, gen, aborts, inbox = await open_generation(tenant="team-a")
    (subject, payload, reply, _headers), = bus.nc.published
    sent = inference_pb2.BatchItem.FromString(payload)
    assert subject == "unimodel.v1.batch.m" and reply == inbox == sent.reply_to
    assert sent.tenant == "team-a" and sent.request_id == "req-1" and sent.deadline_unix_ms > 0
    first = generate_pb2.GenerateChunk(seq=0, worker_id="w1")
    first.usage.prompt_tokens = 7
    for data in (first.SerializeToString(), chunk(1, "He"), chunk(1, "He"), chunk(2, "llo")):
        await mux._on_message(FakeMsg(inbox, data))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    last = generate_pb2.GenerateChunk(seq=3, finish_reason="stop")
    last.usage.prompt_tokens, last.usage.completion_tokens = 7, 2
    await mux._on_message(FakeMsg(inbox, last.SerializeToString()))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    assert (await gen.start()).worker_id == "w1"
    assert await gen.text() == "Hello"  # the repeated chunk 1 is dropped
    assert gen.finish_reason == "stop" and gen.usage.completion_tokens == 2
    assert aborts == [] and mux.pending == 0  # finished: nothing to abort, the inbox is released


async def test_a_gap_ends_the_generation_with_an_error_and_aborts_it() -> None:
    _bus, mux, gen, aborts, inbox = await open_generation()
    for data in (chunk(0), chunk(1, "a"), chunk(3, "c")):
        await mux._on_message(FakeMsg(inbox, data))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await gen.start()
    assert (await gen.__anext__()).text == "a"
    with pytest.raises(errors.Internal, match="chunks 2..2 were lost"):
        await gen.__anext__()
    assert aborts == [("req-1", "the caller went away")]
    assert gen.code == "INTERNAL"


async def test_a_refusal_before_the_start_raises_with_its_metadata() -> None:
    _bus, mux, gen, _aborts, inbox = await open_generation()
    err = errors.InvalidArgument("the prompt has 9 tokens", field="messages", limit="max_prompt_tokens")
    await mux._on_message(FakeMsg(inbox, b"", error_headers(err)))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    with pytest.raises(errors.InvalidArgument) as caught:
        await gen.start()
    assert caught.value.metadata == {"field": "messages", "limit": "max_prompt_tokens"}
    assert mux.pending == 0


async def test_an_error_chunk_after_the_start_raises_it_and_no_responders_fail_at_once() -> None:
    _bus, mux, gen, _aborts, inbox = await open_generation()
    failed = generate_pb2.GenerateChunk(seq=1, finish_reason="error")
    failed.error.CopyFrom(errors.DeadlineExceeded("deadline passed during generation").to_proto())
    for data in (chunk(0), failed.SerializeToString()):
        await mux._on_message(FakeMsg(inbox, data))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await gen.start()
    with pytest.raises(errors.DeadlineExceeded):
        await gen.text()
    _bus, mux, gen, _aborts, inbox = await open_generation()
    await mux._on_message(FakeMsg(inbox, b"", {"Status": "503"}))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    with pytest.raises(errors.Unavailable, match="no instance"):
        await gen.start()


async def test_closing_early_aborts_once_and_a_silent_worker_times_out() -> None:
    _bus, mux, gen, aborts, inbox = await open_generation()
    for data in (chunk(0), chunk(1, "x")):
        await mux._on_message(FakeMsg(inbox, data))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await gen.start()
    await gen.__anext__()
    await gen.close("client left")
    await gen.close("again")
    assert aborts == [("req-1", "client left")] and gen.code == "CANCELLED"
    _bus, mux, gen, aborts, inbox = await open_generation()
    gen.chunk_timeout_s = 0.05
    await mux._on_message(FakeMsg(inbox, chunk(0)))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await gen.start()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(gen.__anext__(), 2)
    assert aborts  # the worker is told to stop what nobody waits for any more


async def test_a_lost_worker_ends_the_generation_after_the_chunks_that_came() -> None:
    _bus, mux, gen, aborts, inbox = await open_generation()
    first = generate_pb2.GenerateChunk(seq=0, worker_id="w1")
    for data in (first.SerializeToString(), chunk(1, "a")):
        await mux._on_message(FakeMsg(inbox, data))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)
    await gen.start()
    assert gen.worker_id == "w1"
    seen = gen.last_seen
    assert (await gen.__anext__()).text == "a" and gen.last_seen >= seen
    gen.worker_lost("worker w1 stopped while generating (its process is gone)")
    with pytest.raises(errors.Unavailable, match="worker w1 stopped while generating"):
        await gen.__anext__()
    assert gen.code == "UNAVAILABLE" and gen.done and mux.pending == 0
    assert aborts == [("req-1", "the caller went away")]  # harmless for a dead worker; a live one stops
