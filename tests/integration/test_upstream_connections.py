"""The openai engine against an upstream that breaks its connections the way llama-cpp-python's server
does: a real HTTP/1.1 server on a free loopback port (asyncio streams), whose behaviour each test sets.

- After a stream it broke off, llama_cpp.server answers 200 with an empty stream and closes the kept-alive
  connection a moment later without a word: the engine's next request, sent on that pooled connection, finds
  it closed before any response byte ("Server disconnected without sending a response"). Nothing started
  upstream, so the engine sends it again on another connection; more than one pooled connection can be stale
  (here: every idle one).
- A stream whose connection closes before the end of its chunked body is a stream that ended before the
  generation finished (UNAVAILABLE saying so), not an upstream that cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from helpers.generation import check_stream, completion
from unimodel.core import errors, modelconfig
from unimodel.worker.engines import create_engine
from unimodel.worker.engines.generative import Delta
from unimodel.worker.engines.openai_upstream import UpstreamEngine

MODEL = "flaky"


@dataclass
class Upstream:
    """What the server does: `stale` closes every kept-alive connection (silently) before the next request
    on it is answered; `cut` ends each completion's stream mid-body by closing the connection."""

    base: str = ""
    stale: bool = False
    cut: bool = False
    requests: int = 0  # completions that were answered
    refused: int = 0  # requests that came on a connection already used, and were dropped unanswered
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(doc: dict[str, object] | str) -> bytes:
    return _chunk(b"data: " + (doc if isinstance(doc, str) else json.dumps(doc)).encode() + b"\n\n")


async def _serve_connection(up: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    up.writers.append(writer)
    answered = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"), 0)
            if length:
                await reader.readexactly(length)
            if answered and up.stale:  # a pooled connection the upstream had closed: no answer at all
                up.refused += 1
                return
            answered += 1
            path = lines[0].split(" ")[1]
            if path.endswith("/models"):
                body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            up.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            choice = {"index": 0, "text": "one", "finish_reason": None}
            writer.write(_event({"id": "c", "object": "text_completion", "choices": [choice]}))
            if up.cut:  # the connection closes before the end of the chunked body
                await writer.drain()
                return
            choice = {"index": 0, "text": " two", "finish_reason": "length"}
            writer.write(_event({"id": "c", "object": "text_completion", "choices": [choice]}))
            writer.write(_event("[DONE]") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    server = await asyncio.start_server(lambda r, w: _serve_connection(up, r, w), "127.0.0.1", 0)
    up.base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        yield up
    finally:
        server.close()
        for writer in up.writers:
            writer.close()
        await server.wait_closed()


async def _engine(base: str) -> UpstreamEngine:
    engine = create_engine(modelconfig.parse({"name": MODEL, "engine": "openai", "llm": {"upstream_url": base}}))
    assert isinstance(engine, UpstreamEngine)
    await engine.load()
    return engine


async def _run(engine: UpstreamEngine) -> list[Delta]:
    prompt = await engine.prepare(completion("count", max_tokens=2), "r")
    return [d async for d in engine.generate(prompt)]


async def test_requests_on_pooled_connections_the_upstream_closed_are_sent_again() -> None:
    async with upstream() as up:
        engine = await _engine(up.base)
        try:
            assert check_stream(await asyncio.wait_for(_run(engine), 10)).completion_tokens == 2
            # two pooled connections at once, both of which the upstream closes: the first request meets both
            results = await asyncio.wait_for(asyncio.gather(_run(engine), _run(engine)), 10)
            up.stale = True
            for _ in range(3):
                assert check_stream(await asyncio.wait_for(_run(engine), 10)).completion_tokens == 2
            assert all(check_stream(r).completion_tokens == 2 for r in results)
            assert up.refused >= 2  # stale connections were met, and the requests went again on new ones
        finally:
            await engine.unload()


async def test_a_stream_cut_before_its_end_is_one_that_ended_before_finishing() -> None:
    async with upstream() as up:
        up.cut = True
        engine = await _engine(up.base)
        try:
            with pytest.raises(errors.Unavailable, match=r"ended the stream before the generation finished \(RemoteProtocolError\)") as info:
                await asyncio.wait_for(_run(engine), 10)
            assert info.value.retry_after_s > 0 and up.base not in info.value.message
            assert up.requests == 1  # a stream that started is never sent again (the upstream generated)
            up.cut = False
            assert check_stream(await asyncio.wait_for(_run(engine), 10)).completion_tokens == 2
        finally:
            await engine.unload()
