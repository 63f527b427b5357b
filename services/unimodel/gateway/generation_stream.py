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

Mid-stream migration: when the worker of a running generation is lost (the stream watch found its
process gone, or the worker ended it with UNAVAILABLE, e.g. stopping), the generation is sent again,
under a new request id and inbox (the lost worker's late chunks go nowhere; it is told to abort the old
id), with GenerateRequest.continuation: the answer's token ids and the text the client has. The new
worker continues the answer, and the chunks the caller iterates go on as if nothing happened: sequence
numbers continue, no text is repeated or missing, the final usage counts the original prompt and the
whole answer. At most `max_migrations` moves per generation; none when the model turned migration off
(no `reopen`), when the worker did not report the ids of every token it sent (its engine cannot
resume), or after the deadline. A move that finds no worker ends the generation with UNAVAILABLE
naming both causes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from unimodel.core import errors, tracing
from unimodel.core.context import RequestContext, new_request_id
from unimodel.core.replies import ReplyStream
from unimodel.core.tracing import Attr, Span
from unimodel.v1 import generate_pb2

log = logging.getLogger("unimodel.gateway.generation")

MAX_MIGRATIONS = 2
"""Moves to another worker per generation at most (a request that kills its workers stops there)."""
MIGRATIONS_ATTR = "unimodel.stream.migrations"
MOVED = "moved"
MOVE_FAILED = "failed"

Reopen = Callable[[generate_pb2.GenerateRequest, RequestContext], Awaitable[ReplyStream]]
"""Send a (continuation) request to the model's batcher; the stream of its answers (like open_stream)."""
OnMove = Callable[["Generation", str, str, float], None]
"""(generation, the lost worker, MOVED or MOVE_FAILED, seconds the move took): metrics, log, watch."""


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
        request: generate_pb2.GenerateRequest | None = None,
        reopen: Reopen | None = None,
        max_migrations: int = MAX_MIGRATIONS,
        on_move: OnMove = lambda g, worker, outcome, seconds: None,
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
        # migration: the request as sent, and the answer so far (what a continuation carries)
        self.request = request
        self._reopen = reopen
        self.max_migrations = max_migrations
        self._on_move = on_move
        self.migrations = 0
        self._ids: list[int] = []  # token ids of the answer so far
        self._parts: list[str] = []  # its text as the caller got it
        self._tokens = 0  # its tokens as counted by the workers (== len(_ids) when they reported every id)
        self._base_tokens = 0  # tokens of the answer made by the workers before the current one
        self._out_seq = 0  # the sequence number of the last chunk handed to the caller
        self._moving = False
        self._path_lost = False  # before start: the batcher or router that held the request is gone
        self.opened_at = time.monotonic()  # when the current request was sent (path_watch)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def worker_id(self) -> str:
        """The worker that accepted the generation (after start())."""
        return self.first.worker_id

    def worker_lost(self, reason: str) -> None:
        """The worker's process is gone: after the chunks that came, the generation moves to another
        worker or ends with UNAVAILABLE. Ignored while a move is under way (it concerns the old worker)."""
        if not self._moving:
            self.stream.fail(errors.Unavailable(reason, retry_after_s=1, model=self.model))

    def path_lost(self, reason: str) -> None:
        """Before a worker accepted it: the batcher or router that may hold the request is gone. `start`
        sends it again (new id and inbox; the old id is aborted, so it never runs besides) while moves
        are left, else it ends with UNAVAILABLE."""
        if not self.first.worker_id and not self._done:
            self._path_lost = True
            self.stream.fail(errors.Unavailable(reason, retry_after_s=1, model=self.model))

    async def _send_unstarted_again(self) -> None:
        assert self._reopen is not None and self.request is not None
        old = self.stream
        old.close()
        try:  # wherever the first request is, it must not start besides this one (workers remember aborts)
            await self._abort(old.ctx, "sent again: the batcher or router that held it is gone")
        except Exception as exc:
            log.warning("could not abort generation %s: %s", self.request_id, exc)
        self.migrations += 1
        ctx = dataclasses.replace(old.ctx, request_id=new_request_id())
        self.opened_at = time.monotonic()
        self.stream = await self._reopen(self.request, ctx)
        self._expected = 0
        log.warning("generation %s of %s sent again as %s: %s", self.request_id, self.model, ctx.request_id, "its path was lost")

    async def start(self) -> generate_pb2.GenerateChunk:
        """Wait for the worker to accept the request (chunk seq 0); its refusal raises. A request whose
        batcher or router died first (`path_lost`) is sent again while moves are left."""
        try:
            while True:
                try:
                    self.first = await self._next()
                    break
                except errors.Unavailable:
                    lost, self._path_lost = self._path_lost, False
                    if not (lost and self._reopen is not None and self.request is not None
                            and self.migrations < self.max_migrations and self.stream.ctx.remaining_s() > 0):
                        raise
                    await self._send_unstarted_again()
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
        while True:
            try:
                chunk = await self._next()
                if chunk.finish_reason and chunk.HasField("error"):
                    stopped = errors.from_proto(chunk.error)
                    if self._movable(stopped):
                        await self._move(stopped)
                        continue
            except errors.UnimodelError as exc:  # lost chunks, silence, NATS: the worker is told to stop
                failed = exc
                if self._movable(exc):
                    try:
                        await self._move(exc)
                        continue
                    except errors.UnimodelError as move_failed:
                        failed = move_failed
                self.code = failed.code_name
                await self.close()
                raise failed from None
            break
        self._out_seq += 1
        chunk.seq = self._out_seq  # continues across moves
        self._parts.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        self._tokens += chunk.tokens
        if chunk.finish_reason:  # usage: the original prompt, the whole answer
            chunk.usage.prompt_tokens = self.usage.prompt_tokens
            chunk.usage.completion_tokens += self._base_tokens
            chunk.usage.total_tokens = chunk.usage.prompt_tokens + chunk.usage.completion_tokens
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

    @property
    def answer_tokens(self) -> int:
        """Tokens of the answer handed to the caller so far."""
        return self._tokens

    def _movable(self, err: errors.UnimodelError) -> bool:
        """Whether `err` (the current worker's end) is worth a move: its worker is lost or stopping
        (UNAVAILABLE), moves are allowed and left, every token so far has its id, time is left."""
        return (
            isinstance(err, errors.Unavailable)
            and self._reopen is not None
            and self.request is not None
            and self.migrations < self.max_migrations
            and len(self._ids) == self._tokens
            and (bool(self._ids) or not any(self._parts))  # text without ids: it would be sent twice
            and self.stream.ctx.remaining_s() > 0
        )

    async def _move(self, cause: errors.UnimodelError) -> None:
        """Send the generation again with the answer so far and wait for a worker to accept it (its seq
        0); raises UNAVAILABLE naming `cause` when none does."""
        assert self._reopen is not None and self.request is not None
        lost = self.first.worker_id
        started = time.perf_counter()
        old = self.stream
        old.close()  # its late chunks are dropped: the new request has its own inbox and id
        try:  # a worker that is only stopping (or cut off) must not go on for nobody
            await self._abort(old.ctx, "the generation moved to another worker")
        except Exception as exc:
            log.warning("could not abort generation %s on worker %s: %s", self.request_id, lost, exc)
        self.migrations += 1
        self._moving = True
        try:
            await self._send_again(lost, cause, old, started)
        finally:
            self._moving = False

    async def _send_again(self, lost: str, cause: errors.UnimodelError, old: ReplyStream, started: float) -> None:
        assert self._reopen is not None and self.request is not None
        request = generate_pb2.GenerateRequest()
        request.CopyFrom(self.request)
        if self._ids:  # nothing generated yet: the request as it was (any engine takes it)
            cont = request.continuation
            cont.token_ids.extend(self._ids)
            cont.text = "".join(self._parts)
            cont.migrations = self.migrations
        ctx = dataclasses.replace(old.ctx, request_id=new_request_id())
        try:
            self.stream = await self._reopen(request, ctx)
            self._expected = 0
            first = await self._next()
        except errors.UnimodelError as exc:
            if self.stream is not old and self.stream.refused:
                self._done = True  # refused: nothing of it runs anywhere, nothing to abort
            self._on_move(self, lost, MOVE_FAILED, time.perf_counter() - started)
            raise errors.Unavailable(
                f"{cause.message}; moving the generation to another worker failed: {exc.message}",
                retry_after_s=1, model=self.model,
            ) from None
        self.first = first
        self._base_tokens = self._tokens
        self._on_move(self, lost, MOVED, time.perf_counter() - started)
        if self.span is not None:
            self.span.set_attribute(Attr.WORKER_ID, first.worker_id)

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
        if self.migrations:
            span.set_attribute(MIGRATIONS_ATTR, self.migrations)
        span.set_attribute(Attr.GENAI_OUTPUT_TOKENS, self.usage.completion_tokens)
        span.set_attribute(Attr.GENAI_FINISH_REASONS, [self.finish_reason])
        if self.first_token_at:
            span.set_attribute(Attr.GENAI_TTFT, self.first_token_at - self.started_at)
        tracing.finish(span, None if self.code == "OK" else self.code)
