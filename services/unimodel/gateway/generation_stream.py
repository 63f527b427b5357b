"""One text generation as the gateway sees it: the worker's chunks, checked and in order.

`Generation.start()` waits for chunk seq 0 (the worker accepted the request: prompt tokens, worker,
path) or the error that refused it, so an API can still answer a plain 4xx/5xx before it commits to a
stream. Iterating then yields the chunks with text, ending with the one that has finish_reason. Every
chunk's sequence number is checked: a repeated one is dropped, a gap (a lost message) ends the
generation with an error instead of returning a text with a hole. `close()` before the end (client
went away, call cancelled) publishes an AbortRequest so the worker stops the engine; not when the request
was refused (an error answer before chunk 0: nothing of it runs anywhere). The abort names the request by
its context (our request id, never a client's, and its deadline); the gateway adds its own instance id,
which scopes it (worker/running_generations.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from unimodel.core import errors, tracing
from unimodel.core.context import RequestContext
from unimodel.core.replies import ReplyStream
from unimodel.core.tracing import Attr, Span
from unimodel.v1 import generate_pb2

log = logging.getLogger("unimodel.gateway.generation")


class TokenMetrics(Protocol):
    """What the gateway measures of a generation as its client sees it (GatewayMetrics)."""

    def first_token(self, model: str, seconds: float) -> None: ...

    def inter_token(self, model: str, seconds: float) -> None: ...

    def output_tokens(self, model: str, n: int) -> None: ...


class Generation:
    def __init__(
        self,
        model: str,
        stream: ReplyStream,
        *,
        chunk_timeout_s: float,
        abort: Callable[[RequestContext, str], Awaitable[None]],
        on_end: Callable[[Generation], None] = lambda g: None,
        metrics: TokenMetrics | None = None,
    ) -> None:
        self.model = model
        self.stream = stream
        self.request_id = stream.ctx.request_id
        self.chunk_timeout_s = chunk_timeout_s
        self._abort = abort
        self._on_end = on_end
        self.first = generate_pb2.GenerateChunk()
        self.usage = generate_pb2.Usage()
        self.finish_reason = ""
        self.code = "OK"  # error code name when it failed (metrics)
        self.started_at = time.perf_counter()
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.chunks = 0
        self.last_seen = self.started_at  # the last message from the worker (gateway.stream_watch)
        self.metrics = metrics
        self.span: Span | None = None  # "stream {model}" while tracing is on: acceptance to the end
        self._expected = 0
        self._done = False
        self._closed = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def worker_id(self) -> str:
        """The worker that accepted the generation (after start())."""
        return self.first.worker_id

    def worker_lost(self, reason: str) -> None:
        """The worker's process is gone: the generation ends with UNAVAILABLE after the chunks that came."""
        self.stream.fail(errors.Unavailable(reason, retry_after_s=1, model=self.model))

    async def start(self) -> generate_pb2.GenerateChunk:
        """Wait for the worker to accept the request (chunk seq 0); its refusal raises."""
        try:
            self.first = await self._next()
        except errors.UnimodelError as exc:
            self.code = exc.code_name
            if self.stream.refused:  # refused (limits, queue full, no worker): nothing to abort
                self._done = True
            await self.close()
            raise
        except BaseException:
            await self.close()
            raise
        self.usage.prompt_tokens = self.first.usage.prompt_tokens
        if tracing.enabled():
            self.span = tracing.start(tracing.Name.stream(self.model), self.stream.ctx.traceparent, tracing.INTERNAL, {
                Attr.MODEL: self.model, Attr.REQUEST_ID: self.request_id, Attr.WORKER_ID: self.first.worker_id,
            })
        return self.first

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> generate_pb2.GenerateChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._next()
        except errors.UnimodelError as exc:  # lost chunks, silence, NATS: the worker is told to stop
            self.code = exc.code_name
            await self.close()
            raise
        if chunk.text:
            now = time.perf_counter()
            self.chunks += 1
            if not self.first_token_at:
                self.first_token_at = now
                if self.metrics is not None:
                    self.metrics.first_token(self.model, now - self.started_at)
            elif self.metrics is not None:
                self.metrics.inter_token(self.model, now - self.last_token_at)
            self.last_token_at = now
        if chunk.finish_reason:
            self._done = True
            self.finish_reason = chunk.finish_reason
            self.usage.CopyFrom(chunk.usage)
            if chunk.HasField("error"):
                err = errors.from_proto(chunk.error)
                self.code = err.code_name
                await self.close()
                raise err
            await self.close()
        return chunk

    async def _next(self) -> generate_pb2.GenerateChunk:
        while True:
            raw = await self.stream.next(self.chunk_timeout_s)
            self.last_seen = time.perf_counter()
            chunk = generate_pb2.GenerateChunk.FromString(raw)
            if chunk.seq < self._expected:
                log.warning("generation %s: dropped repeated chunk %d", self.request_id, chunk.seq)
                continue
            if chunk.seq > self._expected:
                raise errors.Internal(
                    f"generation {self.request_id}: chunks {self._expected}..{chunk.seq - 1} were lost on the way"
                )
            self._expected += 1
            return chunk

    async def text(self) -> str:
        """The rest of the generation as one text (unary answers)."""
        parts = [chunk.text async for chunk in self]
        return "".join(parts)

    async def close(self, reason: str = "") -> None:
        """End the generation here; before its end the worker is told to abort it."""
        if self._closed:
            return
        self._closed = True
        self.stream.close()
        if not self._done:
            self._done = True
            self.finish_reason = self.finish_reason or "abort"
            if self.code == "OK":
                self.code = "CANCELLED"
            try:
                await self._abort(self.stream.ctx, reason or "the caller went away")
            except Exception as exc:  # NATS down: the worker's deadline ends the generation
                log.warning("could not abort generation %s: %s", self.request_id, exc)
        if self.metrics is not None and self.usage.completion_tokens:
            self.metrics.output_tokens(self.model, self.usage.completion_tokens)
        if self.span is not None:
            self._end_span()
        self._on_end(self)

    def _end_span(self) -> None:
        span = self.span
        assert span is not None
        span.set_attribute(Attr.STREAM_CHUNKS, self.chunks)
        span.set_attribute(Attr.GENAI_OUTPUT_TOKENS, self.usage.completion_tokens)
        span.set_attribute(Attr.GENAI_FINISH_REASONS, [self.finish_reason])
        if self.first_token_at:
            span.set_attribute(Attr.GENAI_TTFT, self.first_token_at - self.started_at)
        tracing.finish(span, None if self.code == "OK" else self.code)
