"""Generations on a worker: take a batch of GenerateRequests, stream each one's chunks, abort on demand.

Plain logic over two callables (`publish(subject, data)`, `publish_error(subject, err)`), so it runs the
same under NATS and in tests.

A batch's items are prepared together (prompt rendered and counted, limits checked) and the ones that
pass start generating at once, side by side; the batch is then acknowledged while they run. Each item
answers at its reply_to: refused before it starts -> an error (NATS error headers); started -> chunk
seq 0 (accepted: prompt tokens, worker, path), then one chunk per delta, the last with finish_reason and
usage (or an error). Sequence numbers let the caller see that none is lost or repeated. With the model option
`stream_interval` N > 1, the deltas after the first go N tokens to a chunk (the text and token ids of several
deltas joined; the last chunk and an error end at once, after what was held).

Aborts come by request id (the caller went away), scoped to the gateway that sent the request: a
generation is known by (owner, request id), its owner the reply subject tree its reply_to lies in
(subjects.replies(gateway id)), and an AbortRequest names its gateway, so no gateway can stop another's
generations, and a request id (random, made by the gateway) means nothing under another owner. A running
generation is cancelled, which closes the engine's iteration (the engine stops and frees its slot); an
abort that comes before its item is remembered until the request's deadline (at most ABORT_MEMORY_S, at
most ABORT_MEMORY of them) so the item is dropped when it comes. Deadlines stop a generation with
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from unimodel.core import errors, subjects, tracing
from unimodel.core.context import now_ms
from unimodel.core.tracing import Attr, Span
from unimodel.v1 import generate_pb2, inference_pb2
from unimodel.worker.engines.engine import engine_option
from unimodel.worker.engines.generative import FINISH_ABORT, FINISH_ERROR, Delta, GenerativeEngine, Prompt

log = logging.getLogger("unimodel.gpu-worker.generation")

ABORT_MEMORY = 4096
"""Aborts of items still on their way remembered; the oldest are forgotten first."""
ABORT_MEMORY_S = 60.0
"""How long an abort of an item still on its way is remembered when its deadline is later or unknown
(an item queued longer is generated for nobody: its gateway drops the chunks, its deadline ends it)."""

STREAM_INTERVAL_OPTION = "stream_interval"
"""Model option (ModelConfig.options): after a generation's first delta, its deltas go one message per this
many tokens (default 1: each delta at once). Fewer messages for the worker, NATS and the gateway to handle per
token (each message costs them about the same whatever it holds), at the price of text arriving in bursts:
like vLLM's and SGLang's --stream-interval. The first delta and the last go at once."""

Key = tuple[str, str]
"""(owner, request id): the owner is the reply subject tree of the gateway that sent the item."""


def owner_of(reply_to: str) -> str:
    """The reply subject tree an item's reply_to lies in (`<replies>.<n>` -> `<replies>`)."""
    return reply_to.rpartition(".")[0]

Publish = Callable[[str, bytes], Awaitable[None]]
PublishError = Callable[[str, errors.UnimodelError], Awaitable[None]]


@dataclass(slots=True, eq=False)
class Running:
    request_id: str
    model: str
    key: Key = ("", "")
    task: asyncio.Task[None] | None = None
    aborted: bool = False
    stopped: errors.UnimodelError | None = None  # why the worker ended it (stopping), not its caller
    arrived_ns: int = 0  # perf_counter_ns() when its batch arrived here (time to first token)
    span: Span | None = None  # "chat {model}" / "text_completion {model}" while tracing is on


class GenerationMetrics(Protocol):
    """What a generation reports as it runs (the worker's Prometheus series)."""

    def first_token(self, model: str, seconds: float) -> None: ...

    def inter_token(self, model: str, seconds: float) -> None: ...

    def generation_done(self, model: str, reason: str, tokens: int, decode_s: float) -> None: ...


@dataclass(eq=False)
class GenerationStats:
    """Counters the service exports as metrics (kept here so tests read them without a registry)."""

    started: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    aborted: int = 0
    tokens: int = 0


class Generations:
    def __init__(
        self,
        publish: Publish,
        publish_error: PublishError,
        worker_id: str,
        *,
        on_finish: Callable[[str, str, int], None] = lambda model, reason, tokens: None,
        metrics: GenerationMetrics | None = None,
    ) -> None:
        self.publish = publish
        self.publish_error = publish_error
        self.worker_id = worker_id
        self.on_finish = on_finish
        self.metrics = metrics
        self.running: dict[Key, Running] = {}
        self.stats = GenerationStats()
        self._intervals: weakref.WeakKeyDictionary[GenerativeEngine, int] = weakref.WeakKeyDictionary()
        self._aborted: OrderedDict[Key, float] = OrderedDict()  # aborted before the item came -> forget at (monotonic)

    # aborts -------------------------------------------------------------------------------------
    def abort(self, gateway_id: str, request_ids: list[str] | tuple[str, ...], deadline_unix_ms: int = 0) -> int:
        """Stop these generations of gateway `gateway_id` (only those: see the module's doc); returns how
        many were running here. Ids not running here are remembered until `deadline_unix_ms` (at most
        ABORT_MEMORY_S) in case their items are still on their way."""
        if not gateway_id:
            return 0  # an abort must name its gateway: an id alone stops nothing
        owner = subjects.replies(gateway_id)
        hits = 0
        now = time.monotonic()
        keep_s = ABORT_MEMORY_S
        if deadline_unix_ms > 0:
            keep_s = min(keep_s, (deadline_unix_ms - now_ms()) / 1000.0)
        aborted = self._aborted
        for rid in request_ids:
            if not rid:
                continue
            key = (owner, rid)
            run = self.running.get(key)
            if run is not None and run.task is not None and not run.aborted:
                run.aborted = True
                run.task.cancel()
                hits += 1
            elif run is None and keep_s > 0:
                aborted[key] = now + keep_s
                aborted.move_to_end(key)
        while aborted and (len(aborted) > ABORT_MEMORY or next(iter(aborted.values())) <= now):
            aborted.popitem(last=False)
        return hits

    def _was_aborted(self, key: Key) -> bool:
        """Whether an abort came for this item before it did (forgets it: an item comes once)."""
        until = self._aborted.pop(key, None)
        return until is not None and until > time.monotonic()

    # batches ------------------------------------------------------------------------------------
    async def start_batch(
        self,
        engine: GenerativeEngine,
        batch: inference_pb2.BatchRequest,
        path: list[str],
        *,
        release: Callable[[], None],
        arrived_ns: int = 0,
    ) -> tuple[int, int]:
        """Prepare every item, start those that pass; (started, refused). `release` is called once per
        started item when its generation ends (the model's in-flight count)."""
        now = now_ms()
        items: list[tuple[int, inference_pb2.BatchItem]] = []
        refused = 0
        aborted = self._aborted
        for index, item in enumerate(batch.items):
            if aborted and item.request_id and self._was_aborted((owner_of(item.reply_to), item.request_id)):
                refused += 1  # the caller left before its request got here: nothing to answer
                continue
            if item.deadline_unix_ms and item.deadline_unix_ms <= now:
                refused += 1
                await self._refuse(item, errors.DeadlineExceeded("deadline passed before generation started"))
                continue
            if not item.HasField("generate"):
                refused += 1
                await self._refuse(item, errors.InvalidArgument(
                    f"model {batch.model!r} generates text: the request holds no GenerateRequest", model=batch.model
                ))
                continue
            if item.generate.HasField("continuation") and not engine.resumes:
                refused += 1
                await self._refuse(item, errors.FailedPrecondition(
                    f"model {batch.model!r}: its engine cannot continue a generation that moved from another worker",
                    model=batch.model,
                ))
                continue
            items.append((index, item))
        interval = self._interval(engine)
        prepared = await asyncio.gather(
            *(engine.prepare(item.generate, item.request_id) for _i, item in items), return_exceptions=True
        )
        queue_ns = list(batch.queue_ns) if len(batch.queue_ns) == len(batch.items) else None
        waited = time.perf_counter_ns() - arrived_ns if arrived_ns else 0
        started = 0
        for (index, item), prompt in zip(items, prepared, strict=True):
            if isinstance(prompt, BaseException):
                refused += 1
                await self._refuse(item, _as_error(prompt, batch.model))
                continue
            key = (owner_of(item.reply_to), item.request_id)
            if aborted and item.request_id and self._was_aborted(key):  # aborted while it was prepared
                refused += 1
                continue
            first = generate_pb2.GenerateChunk(
                seq=0, worker_id=self.worker_id, path=path,
                queue_ns=(queue_ns[index] if queue_ns else 0) + waited,
            )
            first.usage.prompt_tokens = prompt.prompt_tokens
            if prompt.continued_ids:
                log.info(
                    "generation %s continues an answer of %d token(s) that moved here from a lost worker",
                    item.request_id, len(prompt.continued_ids),
                )
            await self.publish(item.reply_to, first.SerializeToString())
            run = Running(item.request_id, batch.model, key, arrived_ns=arrived_ns or time.perf_counter_ns())
            if tracing.enabled():
                run.span = self._span(batch.model, item, prompt, arrived_ns)
            run.task = asyncio.create_task(
                self._generate(engine, item, prompt, run, release, interval), name=f"generate {item.request_id}"
            )
            if item.request_id:
                self.running[key] = run
            started += 1
            self.stats.started += 1
        return started, refused

    def _interval(self, engine: GenerativeEngine) -> int:
        """The engine's model's stream_interval, read once per loaded engine."""
        interval = self._intervals.get(engine)
        if interval is None:
            try:
                interval = stream_interval(engine)
            except errors.UnimodelError as exc:  # a bad option: the model's registration should have said so
                log.warning("%s; streaming each delta at once", exc.message)
                interval = 1
            self._intervals[engine] = interval
        return interval

    def _span(self, model: str, item: inference_pb2.BatchItem, prompt: Prompt, arrived_ns: int) -> Span | None:
        """The generation's span (OpenTelemetry GenAI conventions), from its batch's arrival here."""
        request = item.generate
        operation = "chat" if request.messages else "text_completion"
        attributes: dict[str, object] = {
            Attr.GENAI_OPERATION: operation, Attr.GENAI_PROVIDER: tracing.PROVIDER, Attr.GENAI_REQUEST_MODEL: model,
            Attr.GENAI_INPUT_TOKENS: prompt.prompt_tokens, Attr.REQUEST_ID: item.request_id, Attr.WORKER_ID: self.worker_id,
        }
        if request.id:
            attributes[Attr.GENAI_RESPONSE_ID] = request.id
        sampling = request.sampling
        if sampling.max_tokens:
            attributes[Attr.GENAI_MAX_TOKENS] = sampling.max_tokens
        if sampling.HasField("temperature"):
            attributes[Attr.GENAI_TEMPERATURE] = sampling.temperature
        if sampling.HasField("top_p"):
            attributes[Attr.GENAI_TOP_P] = sampling.top_p
        start_ns = time.time_ns() - (time.perf_counter_ns() - arrived_ns) if arrived_ns else None
        return tracing.start(
            tracing.Name.generation(operation, model), item.trace_context.get("traceparent", ""), tracing.INTERNAL,
            attributes, start_ns=start_ns,
        )

    async def _refuse(self, item: inference_pb2.BatchItem, err: errors.UnimodelError) -> None:
        if item.reply_to:
            await self.publish_error(item.reply_to, err)

    async def _generate(
        self,
        engine: GenerativeEngine,
        item: inference_pb2.BatchItem,
        prompt: Prompt,
        run: Running,
        release: Callable[[], None],
        interval: int = 1,
    ) -> None:
        reply_to = item.reply_to
        seq = 1
        completion = 0
        reason = FINISH_ERROR
        final = generate_pb2.GenerateChunk()
        metrics = self.metrics
        first_ns = last_ns = 0
        error: errors.UnimodelError | None = None
        held = _Held()  # deltas not sent yet (stream_interval > 1)
        try:
            timeout = None
            if item.deadline_unix_ms:
                timeout = max(0.0, (item.deadline_unix_ms - now_ms()) / 1000.0)
            async with asyncio.timeout(timeout):
                async for delta in engine.generate(prompt):
                    if delta.tokens:
                        now = time.perf_counter_ns()
                        if not first_ns:
                            first_ns = now
                            if metrics is not None:
                                metrics.first_token(run.model, (now - run.arrived_ns) / 1e9)
                        elif metrics is not None:
                            metrics.inter_token(run.model, (now - last_ns) / 1e9)
                        last_ns = now
                    completion += delta.tokens
                    if held.parts or held.tokens or (interval > 1 and seq > 1 and not delta.finish_reason):
                        held.add(delta)  # the first delta goes at once; then one message per `interval` tokens
                        if held.tokens < interval and not delta.finish_reason:
                            continue
                        chunk = held.chunk(seq)
                    else:
                        chunk = generate_pb2.GenerateChunk(seq=seq, text=delta.text, tokens=delta.tokens, token_ids=delta.token_ids)
                    if delta.finish_reason:
                        reason = delta.finish_reason
                        tokens = delta.completion_tokens or completion
                        prompt_tokens = getattr(delta, "prompt_tokens", 0) or prompt.prompt_tokens
                        chunk.finish_reason = reason
                        chunk.usage.prompt_tokens = prompt_tokens
                        chunk.usage.completion_tokens = tokens
                        chunk.usage.total_tokens = prompt_tokens + tokens
                        completion = tokens
                        await self.publish(reply_to, chunk.SerializeToString())
                        return
                    await self.publish(reply_to, chunk.SerializeToString())
                    seq += 1
            raise errors.Internal(f"model {item.generate.model or '?'}: the engine ended without a finish reason")
        except asyncio.CancelledError:
            if not run.aborted:
                raise  # the service is stopping
            reason = FINISH_ABORT
            self.stats.aborted += 1
            if run.stopped is not None:  # the caller is still there (its generation moves): what was held first
                seq = await self._send_held(reply_to, held, seq)
            final = generate_pb2.GenerateChunk(seq=seq, finish_reason=FINISH_ABORT)
            final.error.CopyFrom((run.stopped or errors.Cancelled("the caller cancelled the generation")).to_proto())
        except TimeoutError:
            reason = FINISH_ERROR
            error = errors.DeadlineExceeded("deadline passed during generation")
            seq = await self._send_held(reply_to, held, seq)
            final = generate_pb2.GenerateChunk(seq=seq, finish_reason=FINISH_ERROR)
            final.error.CopyFrom(error.to_proto())
        except Exception as exc:
            reason = FINISH_ERROR
            error = _as_error(exc, run.model)
            seq = await self._send_held(reply_to, held, seq)
            final = generate_pb2.GenerateChunk(seq=seq, finish_reason=FINISH_ERROR)
            final.error.CopyFrom(error.to_proto())
        finally:
            if self.running.get(run.key) is run:
                del self.running[run.key]
            release()
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
            self.stats.tokens += completion
            decode_s = (last_ns - first_ns) / 1e9
            if metrics is not None:
                metrics.generation_done(run.model, reason, completion, decode_s)
            self.on_finish(run.model, reason, completion)
            if run.span is not None:
                _end_span(run, reason, completion, first_ns, decode_s, error)
        final.usage.prompt_tokens = prompt.prompt_tokens
        final.usage.completion_tokens = completion
        final.usage.total_tokens = prompt.prompt_tokens + completion
        try:
            await self.publish(reply_to, final.SerializeToString())
        except Exception as exc:  # NATS down: the caller's own deadline ends its wait
            log.warning("could not send the end of generation %s: %s", run.request_id, exc)

    async def _send_held(self, reply_to: str, held: _Held, seq: int) -> int:
        """Send the deltas held back (stream_interval) before a generation's error end; the next seq."""
        if not held.tokens and not held.parts:
            return seq
        try:
            await self.publish(reply_to, held.chunk(seq).SerializeToString())
        except Exception as exc:  # NATS down: the end that follows fails the same way
            log.warning("could not send the held text of a generation to %s: %s", reply_to, exc)
            return seq
        return seq + 1

    async def close(self) -> None:
        """Cancel every running generation (service stop after the drain); each caller is told why."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        for run in self.running.values():
            run.aborted = True
            run.stopped = errors.Unavailable(
                f"worker {self.worker_id} is stopping: the generation did not finish within its drain timeout",
                retry_after_s=1, model=run.model,
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self, timeout_s: float) -> None:
        """Drain: let running generations finish, up to `timeout_s`."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


class _Held:
    """Deltas of a generation held back to go as one message (stream_interval)."""

    __slots__ = ("parts", "tokens", "ids")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tokens = 0
        self.ids: list[int] = []

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.parts.append(delta.text)
        self.tokens += delta.tokens
        self.ids.extend(delta.token_ids)

    def chunk(self, seq: int) -> generate_pb2.GenerateChunk:
        """The held deltas as one chunk (and none held any more)."""
        chunk = generate_pb2.GenerateChunk(seq=seq, text="".join(self.parts), tokens=self.tokens, token_ids=self.ids)
        self.parts, self.tokens, self.ids = [], 0, []
        return chunk


def stream_interval(engine: GenerativeEngine) -> int:
    """The model's `options.stream_interval`: after the first, one message per this many tokens (default 1)."""
    return int(engine_option(engine.config, STREAM_INTERVAL_OPTION, int, 1, minimum=1))


def _end_span(
    run: Running, reason: str, tokens: int, first_ns: int, decode_s: float, error: errors.UnimodelError | None
) -> None:
    span = run.span
    assert span is not None
    span.set_attribute(Attr.GENAI_RESPONSE_MODEL, run.model)
    span.set_attribute(Attr.GENAI_OUTPUT_TOKENS, tokens)
    span.set_attribute(Attr.GENAI_FINISH_REASONS, [reason])
    if first_ns:
        span.set_attribute(Attr.GENAI_TTFT, (first_ns - run.arrived_ns) / 1e9)
    if tokens > 1 and decode_s > 0:
        span.set_attribute(Attr.GENAI_TIME_PER_TOKEN, decode_s / (tokens - 1))
    tracing.finish(span, error)


def _as_error(exc: BaseException, model: str) -> errors.UnimodelError:
    if isinstance(exc, errors.UnimodelError):
        return exc
    log.error("model %s: generation failed", model, exc_info=exc)
    return errors.Internal(f"model {model!r}: the engine failed ({type(exc).__name__})")
