"""Mid-stream migration as plain logic: the gateway's Generation moving to another worker when its worker is
lost (gateway/generation_stream.py, over ReplyMux streams), the stream watch's liveness interval, and the
worker's continuation rules (worker/engines/generative.py, worker/running_generations.py)."""

from __future__ import annotations

import asyncio

import pytest
from test_replies import FakeBus, FakeMsg

from unimodel.core import errors
from unimodel.core.bus import error_headers
from unimodel.core.context import RequestContext
from unimodel.core.replies import ReplyMux, ReplyStream
from unimodel.gateway.generation_stream import MOVE_FAILED, MOVED, Generation
from unimodel.gateway.stream_watch import StreamWatch
from unimodel.v1 import generate_pb2, inference_pb2, model_pb2
from unimodel.worker.engines import generative
from unimodel.worker.running_generations import Generations

MODEL = "m"


def chunk(seq: int, text: str = "", ids: tuple[int, ...] = (), finish: str = "", worker: str = "", **usage: int) -> bytes:
    c = generate_pb2.GenerateChunk(seq=seq, text=text, tokens=len(ids), token_ids=ids, finish_reason=finish, worker_id=worker)
    for k, v in usage.items():
        setattr(c.usage, k, v)
    return c.SerializeToString()


class Cluster:
    """One gateway's ReplyMux over a fake bus; every (re)sent generation and abort is recorded."""

    def __init__(self, *, migration: bool = True, max_migrations: int = 2) -> None:
        self.bus = FakeBus()
        self.mux = ReplyMux(self.bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
        self.aborts: list[tuple[str, str]] = []
        self.sent: list[tuple[generate_pb2.GenerateRequest, RequestContext, ReplyStream]] = []
        self.moves: list[tuple[str, str]] = []
        self.migration = migration
        self.max_migrations = max_migrations

    async def open(self, request: generate_pb2.GenerateRequest, ctx: RequestContext) -> ReplyStream:
        item = inference_pb2.BatchItem(generate=request, rows=1)
        stream = await self.mux.open_stream(f"unimodel.v1.batch.{MODEL}", item, ctx)
        self.sent.append((request, ctx, stream))
        return stream

    async def abort(self, ctx: RequestContext, reason: str) -> None:
        self.aborts.append((ctx.request_id, reason))

    async def generation(self, max_tokens: int = 20) -> Generation:
        await self.mux.start()
        request = generate_pb2.GenerateRequest(model=MODEL, prompt="count")
        request.sampling.max_tokens = max_tokens
        request.sampling.temperature = 0
        stream = await self.open(request, RequestContext.new(5, request_id="req-1"))

        def on_move(g: Generation, lost: str, outcome: str, seconds: float) -> None:
            assert seconds >= 0
            self.moves.append((lost, outcome))

        gen = Generation(
            MODEL, stream, chunk_timeout_s=2, abort=self.abort, request=request,
            reopen=self.open if self.migration else None, max_migrations=self.max_migrations, on_move=on_move,
        )
        await self.deliver(chunk(0, worker="w1", prompt_tokens=7))
        await gen.start()
        return gen

    async def deliver(self, *data: bytes, to: int = -1) -> None:
        inbox = self.sent[to][2].inbox
        for d in data:
            await self.mux._on_message(FakeMsg(inbox, d))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg (data, subject, headers)

    async def refuse(self, headers: dict[str, str], to: int = -1) -> None:
        await self.mux._on_message(FakeMsg(self.sent[to][2].inbox, b"", headers))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg


async def until(predicate, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]  # a test helper: any zero-argument callable
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_lost_worker_s_generation_continues_on_another_with_the_answer_so_far() -> None:
    c = Cluster()
    gen = await c.generation()
    await c.deliver(chunk(1, "1, 2", (16, 28, 17)), chunk(2, ",", (28,)))
    got = [await gen.__anext__(), await gen.__anext__()]
    gen.worker_lost("worker w1 stopped while generating (its process is gone)")
    reading = asyncio.create_task(gen.__anext__())
    await until(lambda: len(c.sent) == 2)
    request, ctx, _stream = c.sent[1]
    # the continuation: the whole answer's ids, the text the client has, a new id, the same deadline
    assert list(request.continuation.token_ids) == [16, 28, 17, 28] and request.continuation.text == "1, 2,"
    assert request.continuation.migrations == 1 and request.sampling.max_tokens == 20 and request.prompt == "count"
    assert ctx.request_id != "req-1" and ctx.deadline_ms == c.sent[0][1].deadline_ms
    assert c.aborts == [("req-1", "the generation moved to another worker")]
    await c.deliver(chunk(1, "late", (99,)), to=0)  # the lost worker's late chunk goes nowhere
    await c.deliver(
        chunk(0, worker="w2", prompt_tokens=7), chunk(1, " 3", (18,)),
        chunk(2, ",", (28,), finish="length", prompt_tokens=7, completion_tokens=2),
    )
    got.append(await reading)
    got.append(await gen.__anext__())
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert "".join(g.text for g in got) == "1, 2, 3,"
    assert [g.seq for g in got] == [1, 2, 3, 4]  # numbered on across the move
    assert got[-1].usage.prompt_tokens == 7 and got[-1].usage.completion_tokens == 6 and got[-1].usage.total_tokens == 13
    assert gen.usage.completion_tokens == 6 and gen.finish_reason == "length" and gen.code == "OK"
    assert gen.worker_id == "w2" and gen.migrations == 1 and c.moves == [("w1", MOVED)]
    assert len(c.aborts) == 1 and c.mux.pending == 0  # the end needs no abort; both inboxes released


async def test_a_stopping_worker_s_unavailable_chunk_moves_too_and_before_any_token_the_request_goes_as_it_was() -> None:
    c = Cluster()
    gen = await c.generation()
    stopped = generate_pb2.GenerateChunk(seq=1, finish_reason="abort")
    stopped.error.CopyFrom(errors.Unavailable("worker w1 is stopping", retry_after_s=1).to_proto())
    await c.deliver(stopped.SerializeToString())
    reading = asyncio.create_task(gen.text())
    await until(lambda: len(c.sent) == 2)
    assert not c.sent[1][0].HasField("continuation")  # nothing generated yet: any engine can take it
    await c.deliver(chunk(0, worker="w2"), chunk(1, "hi", (5,), finish="stop", completion_tokens=1))
    assert await reading == "hi" and gen.usage.completion_tokens == 1 and c.moves == [("w1", MOVED)]


async def test_without_migration_or_ids_or_for_other_errors_the_generation_ends_with_its_error() -> None:
    c = Cluster(migration=False)  # the model's llm.migration false
    gen = await c.generation()
    gen.worker_lost("worker w1 stopped while generating (its process is gone)")
    with pytest.raises(errors.Unavailable, match="w1 stopped while generating"):
        await gen.__anext__()
    assert len(c.sent) == 1 and gen.code == "UNAVAILABLE"

    c = Cluster()  # an engine that reports no token ids cannot be resumed exactly
    gen = await c.generation()
    await c.deliver(generate_pb2.GenerateChunk(seq=1, text="a", tokens=1).SerializeToString())
    await gen.__anext__()
    gen.worker_lost("gone")
    with pytest.raises(errors.Unavailable, match="gone"):
        await gen.__anext__()
    assert len(c.sent) == 1

    c = Cluster()  # text counted as no token (an upstream engine's): starting over would repeat it
    gen = await c.generation()
    await c.deliver(generate_pb2.GenerateChunk(seq=1, text="a").SerializeToString())
    await gen.__anext__()
    gen.worker_lost("gone")
    with pytest.raises(errors.Unavailable, match="gone"):
        await gen.__anext__()
    assert len(c.sent) == 1

    c = Cluster()  # a lost chunk is no lost worker: no move
    gen = await c.generation()
    await c.deliver(chunk(2, "a", (1,)))
    with pytest.raises(errors.Internal, match="were lost"):
        await gen.__anext__()
    assert len(c.sent) == 1 and c.moves == []


async def test_a_move_that_finds_no_worker_ends_at_once_naming_both_causes_and_aborts_nothing_more() -> None:
    c = Cluster()
    gen = await c.generation()
    await c.deliver(chunk(1, "a", (1,)))
    await gen.__anext__()
    gen.worker_lost("worker w1 stopped while generating (its process is gone)")
    reading = asyncio.create_task(gen.__anext__())
    await until(lambda: len(c.sent) == 2)
    await c.refuse(error_headers(errors.Unavailable("no instance of 'm' could run the batch", retry_after_s=1)))
    with pytest.raises(errors.Unavailable) as caught:
        await asyncio.wait_for(reading, 2)
    assert "w1 stopped while generating" in caught.value.message and "no instance of 'm'" in caught.value.message
    assert c.moves == [("w1", MOVE_FAILED)] and gen.done and gen.code == "UNAVAILABLE"
    assert c.aborts == [("req-1", "the generation moved to another worker")]  # the refused one runs nowhere
    assert c.mux.pending == 0


async def test_moves_are_bounded_per_generation() -> None:
    c = Cluster(max_migrations=2)
    gen = await c.generation()
    for n in (1, 2):
        gen.worker_lost(f"lost {n}")
        reading = asyncio.create_task(gen.__anext__())
        await until(lambda n=n: len(c.sent) == n + 1)  # type: ignore[misc]  # the loop variable, bound
        await c.deliver(chunk(0, worker=f"w{n + 1}"), chunk(1, str(n), (n,)))
        assert (await reading).text == str(n)
    assert [r.continuation.token_ids[:] for r, _ctx, _s in c.sent[1:]] == [[], [1]]
    gen.worker_lost("lost 3")
    with pytest.raises(errors.Unavailable, match="lost 3"):
        await gen.__anext__()
    assert len(c.sent) == 3 and gen.migrations == 2


def test_the_watch_knows_each_worker_s_silence_and_forgets_a_moved_generation_on_its_old_worker() -> None:
    class Gen:
        def __init__(self, worker_id: str, last_seen: float) -> None:
            self.worker_id, self.last_seen = worker_id, last_seen

        def worker_lost(self, reason: str) -> None:
            raise AssertionError("not lost")

    now = [100.0]
    watch = StreamWatch(silence_s=1.0, clock=lambda: now[0])
    a, b = Gen("w1", 95.0), Gen("w1", 88.0)
    watch.add(a)
    watch.add(b)
    assert watch.silence("w1") == 5.0 and watch.silence("w9") == 0.0  # the most recent message counts
    a.worker_id = "w2"  # a moved: the service forgets it on its old worker, then watches it on the new one
    watch.discard(a, "w1")
    watch.add(a)
    assert watch.silence("w1") == 12.0 and sorted(watch.workers()) == ["w1", "w2"]


# the worker's side --------------------------------------------------------------------------------
def _prompt(max_tokens: int = 10, min_tokens: int = 0) -> generative.Prompt:
    sampling = generate_pb2.SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens)
    return generative.Prompt("r", "text", 3, max_tokens, sampling, tokens=[1, 2, 3])


def test_a_continuation_appends_the_answer_and_leaves_what_is_left_to_generate() -> None:
    cont = generate_pb2.Continuation(token_ids=[7, 8, 9, 10], text="ab")
    p = generative.continued(_prompt(max_tokens=10, min_tokens=6), cont, vocab_size=100)
    assert p.tokens == [1, 2, 3, 7, 8, 9, 10] and p.prompt_tokens == 3  # usage: the original prompt only
    assert p.max_tokens == 6 and p.sampling.min_tokens == 2 and p.continued_ids == [7, 8, 9, 10]
    assert generative.continued(_prompt(max_tokens=3), cont, vocab_size=100).max_tokens == 0  # all generated
    assert generative.held_text(p, "abc,") == "c,"  # held back for a stop string: sent first
    assert generative.held_text(p, "xbc") == ""  # not the client's text: nothing is repeated
    with pytest.raises(errors.InvalidArgument, match="continuation.token_ids"):
        generative.continued(_prompt(), generate_pb2.Continuation(token_ids=[100]), vocab_size=100)


class _NoResume(generative.GenerativeEngine):
    kind = "none"

    async def prepare(self, request: generate_pb2.GenerateRequest, request_id: str) -> generative.Prompt:
        raise AssertionError("a continuation must be refused before prepare")

    def generate(self, prompt: generative.Prompt):  # type: ignore[no-untyped-def, override]  # never called
        raise AssertionError("never called")

    async def load(self) -> None:
        pass

    async def unload(self) -> None:
        pass


async def test_an_engine_that_cannot_resume_refuses_a_continuation() -> None:
    published: list[tuple[str, errors.UnimodelError]] = []

    async def publish(subject: str, data: bytes) -> None:
        raise AssertionError("nothing starts")

    async def publish_error(subject: str, err: errors.UnimodelError) -> None:
        published.append((subject, err))

    gens = Generations(publish, publish_error, "w1")
    engine = _NoResume(model_pb2.ModelConfig(name=MODEL, engine="llamacpp"))
    item = inference_pb2.BatchItem(reply_to="unimodel.v1.reply.gw-1.abc", request_id="r1")
    item.generate.model = MODEL
    item.generate.prompt = "x"
    item.generate.continuation.token_ids.append(5)
    started, refused = await gens.start_batch(engine, inference_pb2.BatchRequest(model=MODEL, items=[item]), [], release=lambda: None)
    assert (started, refused) == (0, 1)
    ((subject, err),) = published
    assert subject == item.reply_to and isinstance(err, errors.FailedPrecondition) and "cannot continue" in err.message
