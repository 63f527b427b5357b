"""gpu-worker runtime: hosts models (models.py), runs the batches the router sends to its NATS subject
(runner.py) and loads / unloads models on command.

Subjects: subjects.worker_infer(id) takes a BatchRequest: each item's result goes straight to the
caller's inbox (item.reply_to) as an InferResponse (tensor items) or PredictResponse (value items), or
as error headers; the router gets a BatchAck. subjects.worker_control(id) takes a ModelCommand and
answers a ModelStatus at once; the registration (InstanceInfo.models / model_states) shows the outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from unimodel.core import blobs, errors, modelconfig, payload_limits, subjects, tracing
from unimodel.core.blobs import Blobs
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import FatalError, Service
from unimodel.core.protowire import varint
from unimodel.core.store import KeyValueStore
from unimodel.core.subjects import Header
from unimodel.core.tracing import Attr, Span
from unimodel.v1 import generate_pb2, inference_pb2, model_pb2, registry_pb2
from unimodel.worker.engines import available_engines, cuda_available
from unimodel.worker.engines.generative import GenerativeEngine
from unimodel.worker.metrics import WorkerMetrics
from unimodel.worker.models import LoadedModel, ModelTable, builtin_config
from unimodel.worker.runner import run_batch
from unimodel.worker.running_generations import Generations
from unimodel.worker.settings import WorkerSettings
from unimodel.worker.tensor_batches import add_tensors

INFLIGHT_REPORT_S = 1.0
"""In-flight counts reach etcd at most this often (state changes go at once)."""
_OUTPUT_TAG = b"\x12"  # PredictResponse.output: field 2, length-delimited


def inflight_report_s(lease_ttl_s: float) -> float:
    """How often in-flight counts may be published: every second (Registration refreshes its lease on
    its own schedule, so frequent value updates cannot starve it)."""
    return INFLIGHT_REPORT_S


def predict_response(model: str, output: struct_pb2.Value, worker_id: str, path: list[str]) -> tuple[bytes, ...]:
    """The encoded PredictResponse as parts to concatenate: its other fields, the output's tag and length, and
    the output. The output is serialized once and appended (protobuf: fields may come in any order) instead of
    being copied into a new message first, and a big answer is held as these parts, never joined: for 60 MB, two
    whole copies fewer (~170 ms here) on the worker's event loop."""
    value = output.SerializeToString()
    head = inference_pb2.PredictResponse(model=model, worker_id=worker_id, path=path).SerializeToString()
    return head, _OUTPUT_TAG, varint(len(value)), value


class WorkerService(Service):
    kind = "gpu-worker"
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings, store: KeyValueStore | None = None) -> None:
        super().__init__(settings, store)
        self.subject = subjects.worker_infer(self.id)
        self.control_subject = subjects.worker_control(self.id)
        self._slots = asyncio.Semaphore(settings.max_concurrent_batches)
        self._executor = concurrent.futures.ThreadPoolExecutor(settings.processing_threads, thread_name_prefix="processing")
        self.models = ModelTable(
            self._models_changed, executor=self._executor, owner=self.id, max_concurrent=settings.max_concurrent_batches,
            upstreams=settings.upstream_policy(),
        )
        # big answers, held until their caller read them (core/blobs.py)
        self.blobs = Blobs(self.bus, self.id, same_host=self.settings.same_host_blobs)
        self._reported: tuple[tuple[str, int], ...] = ()
        self._reports: set[asyncio.Task[None]] = set()
        self.stats = WorkerMetrics(self.metrics.registry, self._model_loads)
        self.generations = Generations(
            self.bus.publish, self.bus.publish_error, self.id, on_finish=self._generation_done, metrics=self.stats
        )

    async def on_start(self) -> None:
        for name in self.settings.model_list:
            await self.models.load_now(builtin_config(name), pinned=True)
        repo = self.settings.model_repository
        for name in self.settings.load_list:
            try:
                config = modelconfig.load(Path(repo) / name)
            except errors.UnimodelError as exc:
                raise FatalError(f"cannot load model {name!r}: {exc.message}") from None
            self.models.load(config, pinned=True)
        await self.blobs.start()
        await self.bus.serve(self.subject, self._on_batch)
        await self.bus.serve(self.control_subject, self._on_control)
        await self.bus.subscribe(subjects.ABORT, self._on_abort)
        self.spawn(self._report_inflight(), "report in-flight batches")

    def instance_info(self) -> registry_pb2.InstanceInfo:
        info = super().instance_info()
        info.nats_subject = self.subject
        info.engines.extend(available_engines())
        info.models.extend(self.models.ready())
        info.model_states.extend(self.models.states())
        if cuda_available():
            info.labels["cuda"] = "true"
        return info

    def refusal(self, config: model_pb2.ModelConfig) -> str:
        """Why this worker cannot host `config` ("" when it can)."""
        if config.engine not in available_engines():
            return f"{self.id} cannot run the {config.engine} engine (engines: {', '.join(available_engines())})"
        return ""

    def _models_changed(self) -> None:
        self._reported = self.models.inflight()
        self.update_registration()
        self.refresh_health()

    def readiness_gap(self) -> str:
        """Ready when every model placed here is loaded (or none is): "" or which are not."""
        return self.models.not_loaded()

    async def _report_inflight(self) -> None:
        period = inflight_report_s(self.settings.lease_ttl_s)
        while True:
            await asyncio.sleep(period)
            now = self.models.inflight()
            if now != self._reported:
                self._reported = now
                self.update_registration()

    # control ------------------------------------------------------------------------------------
    async def _on_control(self, msg: Msg, ctx: RequestContext) -> bytes:
        try:
            command = registry_pb2.ModelCommand.FromString(msg.data)
        except DecodeError:
            raise errors.InvalidArgument("not a ModelCommand") from None
        which = command.WhichOneof("command")
        if which == "load":
            config = model_pb2.ModelConfig()
            config.CopyFrom(command.load)
            modelconfig.apply_defaults(config)
            modelconfig.validate(config, source=f"model {config.name!r}")
            refusal = self.refusal(config)
            if refusal:
                raise errors.FailedPrecondition(refusal)
            self.log.info("command: load model %s (version %s)", config.name, config.version)
            status = self.models.load(config)
        elif which == "unload":
            self.log.info("command: unload model %s", command.unload)
            status = self.models.unload(command.unload)
        else:
            raise errors.InvalidArgument("ModelCommand holds neither load nor unload")
        return status.SerializeToString()

    # batches ------------------------------------------------------------------------------------
    async def _on_abort(self, msg: Msg) -> None:
        try:
            request = generate_pb2.AbortRequest.FromString(msg.data)
        except DecodeError:
            return
        # scoped to the gateway that sent the generations (running_generations.py); no gateway_id: no effect
        hits = self.generations.abort(request.gateway_id, list(request.request_ids), request.deadline_unix_ms)
        if hits:
            self.log.debug(
                "aborted %d generation(s) of gateway %s: %s", hits, request.gateway_id, request.reason or "no reason given"
            )

    def _model_loads(self) -> list[tuple[str, str, int, int, int, int]]:
        # Called from the metrics server's thread: reads plain ints of the table.
        out = []
        for m in self.models.states():
            loaded = self.models.get(m.name)
            peak, busy = (loaded.peak, loaded.busy) if loaded is not None else (0, 0)
            out.append((m.name, registry_pb2.ModelStatus.State.Name(m.state), m.inflight, m.concurrency, peak, busy))
        return out

    def _generation_done(self, model: str, reason: str, tokens: int) -> None:
        # Routers learn at once that a sequence slot freed up (the model was released already).
        loaded = self.models.get(model)
        load = registry_pb2.ModelLoad(worker_id=self.id, model=model, sequences=loaded.inflight if loaded else 0)
        task = asyncio.create_task(self._publish_quietly(subjects.LOAD, load.SerializeToString()))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _publish_quietly(self, subject: str, data: bytes) -> None:
        try:
            await self.bus.publish(subject, data)
        except Exception as exc:  # NATS down: the registration's in-flight count catches up later
            self.log.debug("could not publish on %s: %s", subject, exc)

    async def _fetch_items(self, batch: inference_pb2.BatchRequest) -> None:
        """Read the content of the items sent by reference (core/blobs.py) from their callers and merge it in.
        A caller that is gone fails the batch with UNAVAILABLE saying so (its batcher tries another worker,
        which finds the same; nobody waits for a deadline)."""
        for item in batch.items:
            if item.HasField("blob"):
                left_s = (item.deadline_unix_ms / 1000 - time.time()) if item.deadline_unix_ms else self.settings.request_timeout_s
                data = await blobs.fetch(
                    self.bus, item.blob, timeout_s=max(left_s, 0.001), what="the request", same_host=self.blobs.same_host
                )
                item.ClearField("blob")
                item.MergeFromString(data)  # one C call over the whole content (60 MB: ~40 ms here)
                del data
                await asyncio.sleep(0)  # what waited meanwhile (small batches) goes first

    async def _answer_by_reference(self, reply_to: str, parts: tuple[bytes, ...], deadline_ms: int) -> None:
        """Hold a big answer (the concatenation of `parts`) until its caller read it (or its deadline passed)
        and send the caller its reference."""
        ttl_s = (deadline_ms / 1000 - time.time()) if deadline_ms else self.settings.request_timeout_s
        ref = await self.blobs.hold(*parts, ttl_s=max(ttl_s, 0.0) + 5, once=True)
        await self.bus.publish(reply_to, b"", headers=blobs.answer_headers(ref), what="the answer")

    async def _on_generate(self, model: LoadedModel, engine: GenerativeEngine, batch: inference_pb2.BatchRequest) -> bytes:
        """A batch of GenerateRequests: start them all (each holds the model in flight until it ends), ack."""
        arrived = time.perf_counter_ns()
        path = [*batch.path, self.id]
        # one in-flight count per item, taken now (the batch's own is given back once they started)
        for _ in batch.items:
            self.models.acquire(batch.model)
        started = 0
        try:
            started, refused = await self.generations.start_batch(
                engine, batch, path, release=lambda: self.models.release(model), arrived_ns=arrived,
            )
        finally:
            for _ in range(len(batch.items) - started):
                self.models.release(model)
            self.models.release(model)
        ack = inference_pb2.BatchAck(
            batch_id=batch.batch_id, worker_id=self.id, succeeded=started, failed=refused, load=model.inflight
        )
        return ack.SerializeToString()

    async def _on_batch(self, msg: Msg, ctx: RequestContext) -> bytes:
        batch = inference_pb2.BatchRequest.FromString(msg.data)
        model = self.models.admit(batch.model)
        if model is None:  # every slot of the model is taken: nothing runs, the router or batcher tries again
            return inference_pb2.BatchAck(batch_id=batch.batch_id, worker_id=self.id, busy=True).SerializeToString()
        if any(item.HasField("blob") for item in batch.items):
            try:
                await self._fetch_items(batch)
            except BaseException:
                self.models.release(model)
                raise
        span, arrived_wall = None, 0
        if tracing.enabled():
            span = tracing.start(tracing.Name.worker_batch(batch.model), ctx.traceparent, tracing.SERVER, {
                Attr.MODEL: batch.model, Attr.BATCH_ID: batch.batch_id, Attr.BATCH_SIZE: len(batch.items),
                Attr.INSTANCE: self.id,
            })
            arrived_wall = time.time_ns()
        if isinstance(model.engine, GenerativeEngine):  # the engines whose `generative` is True
            try:
                return await self._on_generate(model, model.engine, batch)  # acked once every generation started
            finally:
                tracing.finish(span)
        arrived = time.perf_counter_ns()
        try:
            async with self._slots:
                started = time.perf_counter_ns()
                outcomes = await run_batch(model, batch, self._executor)
                compute_ns = time.perf_counter_ns() - started
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        finally:
            self.models.release(model)
        computed_wall = time.time_ns() if span is not None else 0
        slot_wait_ns = started - arrived
        queue_ns = batch.queue_ns if len(batch.queue_ns) == len(batch.items) else None
        path = [*batch.path, self.id]
        ack = inference_pb2.BatchAck(batch_id=batch.batch_id, worker_id=self.id)
        failed = 0
        publish = self.bus.publish
        infer_base: inference_pb2.InferResponse | None = None
        layout = model.layout
        # Callers that take ReplyBatch messages (BatchItem.reply_group) get one per batch with all of
        # their answers; the others one message per item at reply_to.
        groups: dict[str, inference_pb2.ReplyBatch] = {}
        for index, (item, outcome) in enumerate(zip(batch.items, outcomes, strict=True)):
            reply_to = item.reply_to
            group = item.reply_group
            if isinstance(outcome, errors.UnimodelError):
                failed += 1
                if group and reply_to:
                    groups.setdefault(group, inference_pb2.ReplyBatch()).replies.add(
                        reply_to=reply_to, error=outcome.to_proto()
                    )
                elif reply_to:
                    await self.bus.publish_error(reply_to, outcome)
                continue
            if not reply_to:
                continue
            if isinstance(outcome, dict):
                if infer_base is None:  # the fields every answer of the batch shares, built once
                    infer_base = inference_pb2.InferResponse(
                        model=batch.model, model_version=model.config.version, worker_id=self.id, path=path,
                        compute_ns=compute_ns, batch_rows=sum(max(1, i.rows) for i in batch.items),
                        queue_ns=slot_wait_ns,
                    )
                reply = inference_pb2.InferResponse()
                reply.CopyFrom(infer_base)
                if item.id:
                    reply.id = item.id
                if queue_ns is not None:
                    reply.queue_ns = slot_wait_ns + queue_ns[index]
                add_tensors(layout, reply.outputs, outcome)
                parts: tuple[bytes, ...] = (reply.SerializeToString(),)
            else:
                parts = predict_response(batch.model, outcome, self.id, path)
            size = sum(len(part) for part in parts)
            if size > self.bus.message_limit:  # not carried by the bus: the caller gets 413 (issue 16)
                failed += 1
                too_large = payload_limits.too_large(size, self.bus.max_payload, "the answer")
                if group:
                    groups.setdefault(group, inference_pb2.ReplyBatch()).replies.add(reply_to=reply_to, error=too_large.to_proto())
                else:
                    await self.bus.publish_error(reply_to, too_large)
                continue
            if size >= payload_limits.BLOB_BYTES:  # held here until the caller read it (core/blobs.py)
                await self._answer_by_reference(reply_to, parts, item.deadline_unix_ms)
                continue
            encoded = parts[0] if len(parts) == 1 else b"".join(parts)
            if group and size < payload_limits.ALONE_BYTES:  # a big answer goes alone, unpacked by nobody
                groups.setdefault(group, inference_pb2.ReplyBatch()).replies.add(reply_to=reply_to, response=encoded)
            else:
                await publish(reply_to, encoded)
        for group, replies in groups.items():
            for part in payload_limits.reply_batches(replies, self.bus.message_limit):  # each fits the bus
                await publish(group, part)
        ack.failed = failed
        ack.succeeded = len(outcomes) - failed
        self.stats.batch(batch.model, compute_ns / 1e9, failed, len(outcomes))
        if span is not None:  # after the answers went out
            self._trace_items(span, batch, outcomes, arrived_wall, computed_wall, compute_ns)
        return ack.SerializeToString()

    def _trace_items(
        self, span: Span, batch: inference_pb2.BatchRequest, outcomes: list[object], arrived_wall_ns: int,
        computed_wall_ns: int, compute_ns: int,
    ) -> None:
        """End the batch's span, and give each request an "infer" span in its own trace (from the batch's
        arrival here to the end of its computation), linked to the batch's."""
        span.set_attribute(Attr.COMPUTE_MS, compute_ns / 1e6)
        span.set_attribute(Attr.BATCH_ROWS, sum(max(1, i.rows) for i in batch.items))
        tracing.finish(span)
        link = [span.get_span_context()]
        name = tracing.Name.infer(batch.model)
        for item, outcome in zip(batch.items, outcomes, strict=True):
            item_span = tracing.start(
                name, item.trace_context.get(Header.TRACEPARENT, ""), tracing.INTERNAL,
                {Attr.MODEL: batch.model, Attr.REQUEST_ID: item.request_id, Attr.WORKER_ID: self.id,
                 Attr.COMPUTE_MS: compute_ns / 1e6, Attr.BATCH_SIZE: len(batch.items)},
                links=link, start_ns=arrived_wall_ns,
            )
            tracing.finish(item_span, outcome if isinstance(outcome, errors.UnimodelError) else None, computed_wall_ns)

    async def on_drain(self, timeout_s: float) -> None:
        await self.generations.wait_idle(timeout_s)

    async def on_close(self) -> None:
        await self.generations.close()
        await self.models.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
