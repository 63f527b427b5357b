"""The streamed OpenAI chunks (gateway/openai/protocol.py, serving.py): a token's SSE event built from the
answer's template is the chunk the general encoder makes, byte for byte, and a stream ends as OpenAI's does."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from test_replies import FakeBus, FakeMsg

from unimodel.core.context import RequestContext
from unimodel.core.replies import ReplyMux
from unimodel.gateway.generation_stream import Generation
from unimodel.gateway.openai.protocol import AnswerShape
from unimodel.gateway.openai.serving import _stream
from unimodel.v1 import generate_pb2, inference_pb2

TEXTS = ["", " hello", 'quote " and \\ backslash', "line\nbreak\ttab\r", "\x00\x1f control", "é 漢字 🙂", "</script>"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_a_text_event_is_the_chunk_the_general_encoder_makes(chat: bool, text: str) -> None:
    shape = AnswerShape(chat, "req-\"1", "models/m\u00e9")  # ids and names that JSON must escape
    event = shape.text_event(text)
    assert event == shape.chunk(text, None)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    doc = orjson.loads(event[6:])
    choice = doc["choices"][0]
    assert (choice["delta"]["content"] if chat else choice["text"]) == text
    assert choice["finish_reason"] is None and doc["model"] == "models/m\u00e9"
    assert doc["object"] == ("chat.completion.chunk" if chat else "text_completion")


async def _events(chunks: list[generate_pb2.GenerateChunk], shape: AnswerShape, include_usage: bool) -> list[bytes]:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus (the members ReplyMux uses)
    await mux.start()
    ctx = RequestContext.new(5, request_id="req-1")
    item = inference_pb2.BatchItem(generate=generate_pb2.GenerateRequest(model="m", prompt="hi"))
    stream = await mux.open_stream("unimodel.v1.batch.m", item, ctx)
    aborts: list[str] = []

    async def abort(ctx: RequestContext, reason: str) -> None:
        aborts.append(reason)

    gen = Generation("m", stream, chunk_timeout_s=2, abort=abort)
    for c in chunks:
        await mux._on_message(FakeMsg(stream.inbox, c.SerializeToString()))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg
    await gen.start()
    done: list[tuple[str, str]] = []
    out = [e async for e in _stream(gen, shape, include_usage, lambda text, finish: done.append((text, finish)))]
    assert aborts == [] and done == [("Hello!", "stop")]
    return out


async def test_a_stream_is_role_text_events_finish_usage_and_done() -> None:
    first = generate_pb2.GenerateChunk(seq=0, worker_id="w1")
    first.usage.prompt_tokens = 5
    last = generate_pb2.GenerateChunk(seq=3, text="!", tokens=1, finish_reason="stop")
    last.usage.completion_tokens = 3
    chunks = [first, generate_pb2.GenerateChunk(seq=1, text="Hel", tokens=1), generate_pb2.GenerateChunk(seq=2, text="lo", tokens=1), last]
    shape = AnswerShape(True, "req-1", "m")
    events = await asyncio.wait_for(_events(chunks, shape, include_usage=True), 5)
    docs = [orjson.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == b"data: [DONE]\n\n"
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"].get("content") for d in docs[1:4]] == ["Hel", "lo", "!"]
    assert docs[4]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert docs[5]["choices"] == [] and docs[5]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert all("usage" not in d for d in docs[:5])
    without = await asyncio.wait_for(_events(chunks, shape, include_usage=False), 5)
    assert without == events[:5] + events[6:]  # the same stream less the usage chunk
