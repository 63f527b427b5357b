"""gateway runtime: HTTP (uvicorn) and gRPC servers, etcd view of the cluster, hand-off to the batcher."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar, overload

import grpc
import uvicorn
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from unimodel.core import blobs, errors, generation_rules, modelconfig, path_watch, subjects, tracing
from unimodel.core.blobs import Blobs
from unimodel.core.context import RequestContext
from unimodel.core.kinds import BATCHER, CACHE, ROUTER, WORKER_KINDS
from unimodel.core.lifecycle import FatalError, Service
from unimodel.core.membership import Discovery, instances_prefix, model_key, models_prefix
from unimodel.core.replies import Encoded, ReplyMux, ReplyStream
from unimodel.core.store import StoreError
from unimodel.gateway import catalog
from unimodel.gateway.admin import registration
from unimodel.gateway.app import add_grpc_services, compose_http
from unimodel.gateway.auth import ApiKeys, GrpcAuthInterceptor, check_exposure
from unimodel.gateway.big_bodies import BodyCodec
from unimodel.gateway.cache_client import CacheClient
from unimodel.gateway.generation_stream import MOVED, Generation, Reopen
from unimodel.gateway.http_protocol import CoalescingHttpToolsProtocol
from unimodel.gateway.kserve.cluster_stats import ClusterStatistics
from unimodel.gateway.kserve.codec import check_inputs
from unimodel.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from unimodel.gateway.rate_limits import GrpcRateLimitInterceptor, RateLimiter
from unimodel.gateway.settings import GatewaySettings
from unimodel.gateway.statistics import ModelStatistics, ReplyTimes, StatsView
from unimodel.gateway.stream_watch import StreamWatch
from unimodel.gateway.traces import GrpcTracingInterceptor
from unimodel.v1 import generate_pb2, inference_pb2, model_pb2, registry_pb2

STREAM_SILENCE_S = 1.0
"""A worker none of whose generations sent anything for this long is asked whether it is alive."""
STREAM_PROBE_TIMEOUT_S = 1.0
RECONNECT_SETTLE_S = 1.0
"""After a NATS reconnect, how long the peers get to subscribe again before lost work is sent again."""
RECONNECT_SILENCE_S = 3.0
"""A running generation silent since a NATS reconnect, for this long: its chunks were lost (it moves)."""
CACHE_STALL_S = 0.2
CACHE_WATCH_INTERVAL_S = 0.1
"""Cache calls are short (a query waits cache_timeout_s, 0.5 s): the cache replicas are probed once a call
has waited CACHE_STALL_S, checked every CACHE_WATCH_INTERVAL_S (_watch_cache)."""
STREAM_LIVENESS_S = 10.0
"""A worker whose generations sent nothing for this long and that does not answer its probe is lost."""
NO_BATCHER_WAIT_S = 3.0
"""A request NATS answered "no responders" (no batcher subscribed right now) is sent again every 0.25 s for
up to this long before it fails with 503 (ReplyMux.no_responders_wait_s), as a batcher does for routers."""

Reply = TypeVar("Reply", inference_pb2.PredictResponse, inference_pb2.InferResponse)
T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class Outcome:
    """A request's start (perf_counter) and result code, for its metrics."""

    started: float
    code: str = "OK"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our service: signals stay with the Service lifecycle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayService(Service):
    kind = "gateway"
    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings, **kw: Any) -> None:
        try:  # the key table (grpc_interceptors reads it); no keys: loopback only unless insecure_open
            self.auth = ApiKeys.from_settings(settings)
            self.exposure_warning = check_exposure(settings, self.auth)
        except ValueError as exc:
            raise FatalError(str(exc)) from None
        self.rate_limiter = RateLimiter.from_settings(settings)  # per-key rpm / tpm (HTTP and gRPC share it)
        super().__init__(settings, **kw)
        self.blobs = Blobs(self.bus, self.id, same_host=self.settings.same_host_blobs)  # big items held while their request waits (core/blobs.py)
        self.replies = ReplyMux(self.bus, self.id, self.blobs)  # answers of batch-path requests, singly or in ReplyBatches
        # no batcher subscribed for a moment (all restarting, or moving to another NATS cluster node): try again
        self.replies.no_responders_wait_s = NO_BATCHER_WAIT_S
        self.cache = CacheClient(self.bus, settings.cache_timeout_s)
        self.body_codec = BodyCodec(settings.offload_body_bytes, settings.offload_processes)  # big bodies, off the loop
        self.instances: Discovery[registry_pb2.InstanceInfo] = Discovery(
            self.store, instances_prefix(settings.etcd_prefix), registry_pb2.InstanceInfo.FromString,
            on_change=self._on_instance_change,
        )
        self.registered: Discovery[model_pb2.ModelConfig] = Discovery(
            self.store, models_prefix(settings.etcd_prefix), model_pb2.ModelConfig.FromString,
            on_change=self._on_instance_change,
        )
        self._models: dict[str, catalog.ModelEntry] = {}
        self._configs: dict[str, model_pb2.ModelConfig] = {}
        self._first_seen: dict[str, int] = {}
        self.streams = StreamWatch(STREAM_SILENCE_S)  # running generations by worker, for the liveness probe
        self._probe_now = asyncio.Event()
        self._starting: set[Generation] = set()  # generations no worker accepted yet (path watch)
        self._reconnected_at = 0.0  # perf_counter() of the last NATS reconnect (0: none)
        self.bus.on_reconnect = self._bus_reconnected
        self.stats = GatewayMetrics(self.metrics.registry)
        self.model_stats = ModelStatistics()  # KServe v2 model statistics
        self.cluster_stats = ClusterStatistics(  # ... added up over every gateway (kserve/cluster_stats.py)
            self.bus, self.model_stats, lambda: catalog.kinds_present(self.instances.items).get("gateway", 0)
        )
        http = compose_http(self)
        self.api = http.api  # every documented route, OpenAPI
        self.app = http.app  # what uvicorn serves
        self.http_port = 0
        self._http: _EmbeddedServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        add_grpc_services(self.grpc, self)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        keys = self.auth
        # tracing is set up before the service is built (run_service): no interceptor at all while it is off
        tracing_interceptor: list[grpc.aio.ServerInterceptor] = [GrpcTracingInterceptor()] if tracing.enabled() else []
        limits: list[grpc.aio.ServerInterceptor] = (
            [GrpcRateLimitInterceptor(self.rate_limiter, keys)] if self.rate_limiter.enabled else []
        )  # only keys have limits
        # no keys: every caller is the anonymous admin (loopback only), nothing to check per call
        return [GrpcAuthInterceptor(keys), *limits, *tracing_interceptor] if keys.enabled else tracing_interceptor

    # cluster view ------------------------------------------------------------------------------
    def _on_instance_change(self, key: str, old: object, new: object) -> None:
        self._configs = {c.name: c for c in self.registered.items.values()}
        self._models = catalog.models(self.instances.items, self._configs)
        if new is None and isinstance(old, registry_pb2.InstanceInfo) and old.kind in WORKER_KINDS:
            self._probe_now.set()  # a worker left: check at once whether its generations lost it

    def first_seen(self, name: str) -> int:
        """Unix time this gateway first saw model `name` (OpenAI's `created`)."""
        return self._first_seen.setdefault(name, int(time.time()))

    def models(self) -> dict[str, catalog.ModelEntry]:
        """Registered and hosted models (recomputed on every etcd change, not per request)."""
        return self._models

    def configs(self) -> dict[str, model_pb2.ModelConfig]:
        """Registered models' configs, by name."""
        return self._configs

    def model_ready(self, name: str) -> bool:
        entry = self._models.get(name)
        return entry is not None and bool(entry.instances)

    def require_ready(self, name: str) -> catalog.ModelEntry | None:
        """The model's entry if an instance serves it. NotFound for an unknown model, Unavailable (503 +
        Retry-After) while it is registered but not loaded yet. None before the first etcd sync: the
        request goes on and the router decides."""
        if not name or not subjects.is_valid_model_name(name):
            raise errors.InvalidArgument(f"invalid model name {name!r}", field="model")
        entry = self._models.get(name)
        if entry is not None and entry.instances:
            return entry
        if entry is not None:
            if entry.state == "FAILED":
                # the load error may name files and upstreams: only the model's status shows it, to admins
                raise errors.Unavailable(
                    f"model {name!r} failed to load (GET /v1/models/{name}/status with an admin key says why)",
                    retry_after_s=5, model=name,
                )
            raise errors.Unavailable(f"model {name!r} is loading", retry_after_s=1, model=name)
        if self.instances.synced.is_set() and self.registered.synced.is_set():
            raise errors.NotFound(f"model {name!r} not found", model=name)
        return None

    def readiness(self) -> dict[str, bool]:
        # "etcd": both the instances and the registered models were read once (before that, a model could
        # look registered but not yet served, and its requests would be answered "loading")
        synced = self.instances.synced.is_set() and self.registered.synced.is_set()
        checks = catalog.readiness(self.instances.items, self.bus.connected, synced)
        # 503 from the moment a stop begins, so load balancers take the gateway out while it drains
        checks["accepting"] = not self._stop_requested.is_set()
        return checks

    # model registration ---------------------------------------------------------------------------
    async def register_model(self, body: object) -> model_pb2.ModelConfig:
        """POST /v1/models: validate, then store the config in etcd; the router places it on workers."""
        config = registration.resolve(
            body, self.settings.model_repository, self.settings.models_root, self._upstream_policy()
        )
        await self._put_config(config)
        self.log.info("registered model %s (%s engine, from %s)", config.name, config.engine, config.path)
        return config

    def _upstream_policy(self) -> modelconfig.UpstreamPolicy:
        return registration.upstream_policy(self.settings.upstream_urls, self.settings.upstream_key_envs)

    async def unregister_model(self, name: str) -> None:
        if name not in self._configs:
            raise errors.NotFound(f"model {name!r} is not registered", model=name)
        try:
            await self.store.delete(model_key(self.settings.etcd_prefix, name).encode())
        except StoreError as exc:
            raise errors.Unavailable(f"cannot unregister {name!r}: etcd: {exc}", retry_after_s=1) from None
        self.registered.apply(model_key(self.settings.etcd_prefix, name), None)
        self.log.info("unregistered model %s", name)

    async def _put_config(self, config: model_pb2.ModelConfig) -> None:
        key = model_key(self.settings.etcd_prefix, config.name)
        try:
            await self.store.put(key.encode(), config.SerializeToString())
        except StoreError as exc:
            raise errors.Unavailable(f"cannot register {config.name!r}: etcd: {exc}", retry_after_s=1) from None
        self.registered.apply(key, config)  # read-your-writes: the watch confirms it shortly

    async def _load_repository_models(self) -> None:
        """Register --load-models from the repository at start (Triton's --model-repository habit)."""
        for folder in registration.repository_models(self.settings.model_repository, self.settings.load_models):
            try:
                config = registration.resolve(
                    {"name": folder.name}, self.settings.model_repository, "", self._upstream_policy()
                )
                await self._put_config(config)
                self.log.info("registered %s from the model repository", config.name)
            except errors.UnimodelError as exc:
                self.log.error("cannot register %s from the repository: %s", folder.name, exc.message)

    # the request path -----------------------------------------------------------------------------
    async def predict(
        self, model: str, value: struct_pb2.Value, parameters: dict[str, str], ctx: RequestContext, api: str = "http"
    ) -> inference_pb2.PredictResponse:
        """UniModel predict: hand one input to the batcher, wait for its worker's answer; records metrics."""
        item = inference_pb2.BatchItem(input=value, parameters=parameters, rows=1)
        return await self._call(model, item, ctx, api, inference_pb2.PredictResponse, tensors=False)

    async def predict_encoded(
        self, model: str, item: Encoded, ctx: RequestContext, api: str = "http"
    ) -> Encoded | inference_pb2.BlobRef:
        """predict with the BatchItem encoded already (a big body, encoded off the event loop, big_bodies.py):
        the worker's encoded PredictResponse, left for the caller to decode (off the loop too). A big item
        and a big answer travel by reference (core/blobs.py); a big answer this process can map from the
        worker's memory file comes as its BlobRef (the caller reads it, then calls `answer_read`)."""
        with self._observing(api, model):
            self.require_ready(model)
            return await self._send(model, item, ctx, local_answer=True)

    async def infer_encoded(
        self, model: str, item: Encoded, rows: int, ctx: RequestContext,
        render: Callable[[Encoded | inference_pb2.BlobRef], Awaitable[tuple[T, ReplyTimes]]], api: str = "http",
    ) -> T:
        """infer with the BatchItem parsed, checked against the model's config and encoded already (a big KServe
        body, in the helper processes: kserve/big_infer.py): the worker's answer goes to `render` (which reads
        it off the event loop too) and its result is returned; records the metrics and model statistics."""
        times: ReplyTimes | None = None
        with self._observing(api, model, lambda outcome: self._record_model_stats(model, outcome, rows, times)):
            self.require_ready(model)
            result, times = await render(await self._send(model, item, ctx, local_answer=True))
            return result

    def _record_model_stats(self, model: str, outcome: Outcome, rows: int, times: ReplyTimes | None) -> None:
        """KServe statistics of one tensor request: a success with the worker's times (`times`), else its outcome."""
        if model not in self._models:
            return
        elapsed_ns = int((time.perf_counter() - outcome.started) * 1e9)
        if times is not None:
            self.model_stats.record(
                model, True, elapsed_ns, rows or 1, queue_ns=times.queue_ns, compute_ns=times.compute_ns,
                batch_rows=times.batch_rows,
            )
        else:
            self.model_stats.record(model, outcome.code == "OK", elapsed_ns, rows or 1)

    async def cluster_model_stats(self) -> StatsView:
        """KServe statistics added up over every gateway of the cluster (kserve/cluster_stats.py)."""
        return await self.cluster_stats.gather()

    async def answer_read(self, ref: inference_pb2.BlobRef) -> None:
        """The answer `ref` (from predict_encoded) was read from its memory file: its worker may let it go."""
        await blobs.done(self.bus, ref)

    async def infer(
        self, model: str, item: inference_pb2.BatchItem, ctx: RequestContext, api: str = "http"
    ) -> inference_pb2.InferResponse:
        """KServe v2 infer: check the tensors against the model's config, batch, wait for the answer."""
        return await self._call(model, item, ctx, api, inference_pb2.InferResponse, tensors=True)

    @contextlib.contextmanager
    def _observing(self, api: str, model: str, after: Callable[[Outcome], None] | None = None) -> Iterator[Outcome]:
        """Records the request metrics of what runs inside: its result code and time; then `after`."""
        outcome = Outcome(time.perf_counter())
        try:
            yield outcome
        except errors.UnimodelError as exc:
            outcome.code = exc.code_name
            raise
        except Exception:
            outcome.code = "INTERNAL"
            raise
        finally:
            self._observe(api, model, outcome.code, outcome.started)
            if after is not None:
                after(outcome)

    async def _call(
        self, model: str, item: inference_pb2.BatchItem, ctx: RequestContext, api: str, reply_type: type[Reply],
        *, tensors: bool,
    ) -> Reply:
        """The one request path of both APIs: readiness, (tensor checks), batcher, the worker's answer;
        records the request metrics, and for tensor requests the KServe model statistics."""
        reply = None

        def statistics(outcome: Outcome) -> None:
            if tensors:  # with the worker's queue and compute times once its answer is in
                times = ReplyTimes(reply.queue_ns, reply.compute_ns, reply.batch_rows) if isinstance(reply, inference_pb2.InferResponse) else None
                self._record_model_stats(model, outcome, item.rows, times)

        with self._observing(api, model, statistics):
            self.require_ready(model)
            config = self._configs.get(model)
            if tensors and config is not None:
                item.rows = check_inputs(config, item)
            raw = await self._send(model, item, ctx)
            reply = reply_type.FromString(raw)
            reply.path.insert(0, self.id)
            return reply

    async def generate(
        self, request: generate_pb2.GenerateRequest, ctx: RequestContext, api: str = "http", tenant: str = ""
    ) -> Generation:
        """Text generation: check the request and the model's limits, hand it to the batcher, wait until
        a worker accepted it (chunk seq 0) and return the running Generation (the caller iterates and
        closes it). Refusals (unknown model, limits, queue full) raise before anything streams."""
        model = request.model
        started = time.perf_counter()
        try:
            self.require_ready(model)
            generation_rules.validate(request)
            if request.HasField("continuation"):  # only the gateway's own moves carry one (worker resume)
                raise errors.InvalidArgument("continuation is set by the gateway only", model=model, field="continuation")
            config = self._configs.get(model)
            if config is not None:
                if not modelconfig.is_generative(config):
                    raise errors.InvalidArgument(
                        f"model {model!r} does not generate text (engine {config.engine}): use "
                        f"/v1/models/{model}:predict or /v2/models/{model}/infer", model=model, field="model",
                    )
                generation_rules.check_max_tokens(config, request.sampling.max_tokens)
            if not request.session:
                request.session = generation_rules.session_key(request)
            item = inference_pb2.BatchItem(generate=request, rows=1, tenant=tenant)
            stream = await self.replies.open_stream(subjects.batch(model), item, ctx)
        except errors.UnimodelError as exc:
            self._observe(api, model, exc.code_name, started)
            raise
        def on_end(g: Generation) -> None:
            self.streams.discard(g)
            self._observe(api, model, g.code, g.started_at)

        migration = config is None or not config.llm.HasField("migration") or config.llm.migration
        gen = Generation(
            model, stream, chunk_timeout_s=self.settings.generate_timeout_s, abort=self._abort_generation,
            on_end=on_end, metrics=self.stats, request=request,
            reopen=self._reopen_generation(model, tenant) if migration else None, on_move=self._generation_moved,
        )
        self._starting.add(gen)
        try:
            await gen.start()
        finally:
            self._starting.discard(gen)
        if not gen.done:
            self.streams.add(gen)
        return gen

    async def _watch_streams(self) -> None:
        """End the generations of a worker whose process is gone (NATS: no responders on its liveness
        subject) instead of letting their clients wait for the deadline. Only workers whose generations
        all fell silent are asked (a streaming worker proves itself with every chunk)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), STREAM_SILENCE_S / 2)
            force = self._probe_now.is_set()
            self._probe_now.clear()
            for worker in self.streams.workers() if force else self.streams.silent_workers():
                try:
                    alive = await self.bus.alive(worker, STREAM_PROBE_TIMEOUT_S)
                except Exception as exc:  # a probe that fails says nothing; the watch goes on
                    self.log.warning("could not probe worker %s: %s", worker, exc)
                    continue
                if alive is False:
                    n = self.streams.lost(worker, f"worker {worker} stopped while generating (its process is gone)")
                    self.log.warning("worker %s is gone: ended its %d running generation(s)", worker, n)
                elif alive is None and (cause := self._unresponsive(worker)):  # hung, or cut off from the network
                    n = self.streams.lost(worker, f"worker {worker} {cause} and does not answer its liveness probe")
                    self.log.warning("worker %s does not answer: ended its %d running generation(s)", worker, n)
            if self._reconnected_at:
                for gen in self.streams.silent_since(self._reconnected_at, RECONNECT_SILENCE_S):
                    gen.worker_lost(f"nothing came from worker {gen.worker_id} since NATS reconnected: its chunks were lost")

    def _bus_reconnected(self) -> None:
        """After a NATS reconnect, what was on its way may be lost (core NATS keeps nothing for a client
        that is away, and a peer may have resubscribed after an answer was sent): `_after_reconnect`."""
        self._reconnected_at = time.perf_counter()
        self.spawn(self._after_reconnect(time.monotonic()), "after a NATS reconnect")

    async def _after_reconnect(self, reconnected: float) -> None:
        """Once the peers had time to subscribe again: send again every request still waiting that was sent
        before the reconnect (first answer wins), and every generation no worker accepted yet (new id, the
        old one aborted). Running generations that hear nothing from then on are checked by _watch_streams."""
        await asyncio.sleep(RECONNECT_SETTLE_S)
        try:
            sent = await self.replies.resend(before=reconnected)
        except errors.UnimodelError as exc:
            self.log.warning("after a NATS reconnect, could not send waiting requests again: %s", exc)
            return
        starting = [g for g in self._starting if g.opened_at < reconnected]
        for gen in starting:
            gen.path_lost("the connection to NATS was re-established while it waited")
        if sent or starting:
            self.stats.resent.inc(sent)
            self.log.warning("NATS reconnected: sent %d waiting request(s) and %d generation(s) again", sent, len(starting))

    async def _watch_paths(self) -> None:
        """Send again what a batcher or router took with it when its process died (core/path_watch.py):
        while a request or a generation not yet accepted by a worker has waited over path_watch.STALL_S,
        the registered batchers and routers are asked whether they are still connected. A gone batcher:
        its waiting requests are sent again (ReplyMux.resend). A gone batcher or router: generations not
        yet accepted are sent again under a new id, the old one aborted (Generation.path_lost). Batches
        a gone router held are sent again by their batcher. A batcher, router or worker that reconnected
        to NATS since the oldest wait began (its node of a NATS cluster died) counts as gone once: what
        passed through the dead node is lost."""
        watch = path_watch.PathWatch(lambda i: self.bus.alive(i, path_watch.PROBE_TIMEOUT_S), path_watch.STALL_S)
        while True:
            await asyncio.sleep(path_watch.INTERVAL_S)
            # workers too: one that moved to another NATS node (its node died) may have lost answers on the way
            kinds = {i.id: i.kind for i in self.instances.items.values() if i.kind in (BATCHER, ROUTER, *WORKER_KINDS)}
            waits = [t for t in (self.replies.oldest_wait(), *(g.opened_at for g in self._starting)) if t is not None]
            checked = time.monotonic()
            found = await watch.check(min(waits, default=None), kinds)
            gone = [i for i in found if kinds[i] in (BATCHER, ROUTER) or i in watch.reconnected]  # a dead worker: not here
            if not gone:
                continue
            names = ", ".join(f"{kinds[i]} {i}" for i in gone)
            starting = [g for g in self._starting if g.opened_at < checked and any(kinds[i] in (BATCHER, ROUTER) for i in gone)]
            for gen in starting:
                gen.path_lost(f"{names} stopped while holding this request")
            sent = 0
            if any(kinds[i] == BATCHER for i in gone) or watch.reconnected:
                # a peer that only reconnected lost what was on its way before it did, not what came after
                before = checked if any(i not in watch.reconnected for i in gone) else max(watch.reconnected.values())
                try:
                    sent = await self.replies.resend(before=before)
                except errors.UnimodelError as exc:  # NATS is down: they fail as they would have
                    self.log.warning("%s gone; could not send its requests again: %s", names, exc)
                self.stats.resent.inc(sent)
            what = "reconnected to NATS" if set(gone) <= set(watch.reconnected) else "is gone"
            self.log.warning("%s %s: sent %d waiting request(s) and %d generation(s) again", names, what, sent, len(starting))

    async def _watch_cache(self) -> None:
        """Send again the cache calls a dead cache replica held (gateway/cache_client.py): while a call has
        waited over CACHE_STALL_S, the registered cache replicas are asked whether they are still connected
        (core/path_watch.py); one that is gone, or reconnected to NATS since, may have held it."""
        watch = path_watch.PathWatch(lambda i: self.bus.alive(i, path_watch.PROBE_TIMEOUT_S), CACHE_STALL_S)
        while True:
            await asyncio.sleep(CACHE_WATCH_INTERVAL_S)
            replicas = [i.id for i in self.instances.items.values() if i.kind == CACHE]
            checked = time.monotonic()
            gone = await watch.check(self.cache.oldest_wait(), replicas)
            if not gone:
                continue
            before = checked if any(i not in watch.reconnected for i in gone) else max(watch.reconnected.values())
            sent = self.cache.resend(before)
            self.stats.resent.inc(sent)
            what = "reconnected to NATS" if set(gone) <= set(watch.reconnected) else "is gone"
            self.log.warning("cache %s %s: sent %d waiting cache call(s) again", ", ".join(gone), what, sent)

    def _unresponsive(self, worker: str) -> str:
        """Why a worker that did not answer its liveness probe counts as lost ("" while it does not): its
        registration left etcd (its lease is gone), or its generations sent nothing for
        STREAM_LIVENESS_S (a hung process, or one cut off from the network, that NATS still lists)."""
        if not any(i.id == worker for i in self.instances.items.values()):
            return "left etcd (its lease is gone)"
        silent = self.streams.silence(worker)
        return f"sent nothing for {silent:.0f}s" if silent >= STREAM_LIVENESS_S else ""

    def _reopen_generation(self, model: str, tenant: str) -> Reopen:
        """How a generation of `model` is sent again when its worker is lost (Generation._move)."""

        async def reopen(request: generate_pb2.GenerateRequest, ctx: RequestContext) -> ReplyStream:
            item = inference_pb2.BatchItem(generate=request, rows=1, tenant=tenant)
            return await self.replies.open_stream(subjects.batch(model), item, ctx)

        return reopen

    def _generation_moved(self, gen: Generation, lost: str, outcome: str, seconds: float) -> None:
        self.stats.migrated(gen.model, outcome, seconds)
        self.streams.discard(gen, lost)
        if outcome == MOVED:
            self.streams.add(gen)
            self.log.warning(
                "generation %s of %s moved from worker %s to %s after %d token(s) in %.3fs (move %d)",
                gen.request_id, gen.model, lost, gen.worker_id, gen.answer_tokens, seconds, gen.migrations,
            )
        else:
            self.log.warning("generation %s of %s lost worker %s and could not move", gen.request_id, gen.model, lost)

    async def _abort_generation(self, ctx: RequestContext, reason: str) -> None:
        """Tell the workers to stop this gateway's generation `ctx.request_id` (only this gateway's: the
        abort names it, and workers match it against the generation's reply subject)."""
        abort = generate_pb2.AbortRequest(
            request_ids=[ctx.request_id], reason=reason, gateway_id=self.id, deadline_unix_ms=ctx.deadline_ms
        )
        await self.bus.publish(subjects.ABORT, abort.SerializeToString())

    @overload
    async def _send(
        self, model: str, item: inference_pb2.BatchItem | Encoded, ctx: RequestContext, *, local_answer: Literal[False] = False
    ) -> Encoded: ...

    @overload
    async def _send(
        self, model: str, item: inference_pb2.BatchItem | Encoded, ctx: RequestContext, *, local_answer: bool
    ) -> Encoded | inference_pb2.BlobRef: ...

    async def _send(
        self, model: str, item: inference_pb2.BatchItem | Encoded, ctx: RequestContext, *, local_answer: bool = False
    ) -> Encoded | inference_pb2.BlobRef:
        """The item to the model's batcher, and its worker's answer (ReplyMux.request_item, `local_answer` too)."""
        return await self.replies.request_item(
            subjects.batch(model), item, ctx, timeout_s=self.settings.request_timeout_s,
            bundle_subject=subjects.bundle(model), local_answer=local_answer,
        )

    def _observe(self, api: str, model: str, code: str, started: float) -> None:
        label = model if model in self._models else UNKNOWN_MODEL
        self.stats.observe(api, label, code, time.perf_counter() - started)

    # lifecycle --------------------------------------------------------------------------------------
    async def on_start(self) -> None:
        if self.exposure_warning:
            self.log.warning("%s", self.exposure_warning)
        if self.settings.max_body_bytes > self.bus.max_payload:  # nats-server's, from its INFO
            self.log.warning(
                "max_body_bytes (%d) is over nats-server's max_payload (%d): requests bigger than %d bytes once "
                "encoded get 413 naming that limit (docs/operations.md, Big payloads)", self.settings.max_body_bytes,
                self.bus.max_payload, self.bus.message_limit,
            )
        await self.replies.start()
        await self.blobs.start()
        await self.cluster_stats.start()
        self.spawn(self._watch_streams(), "watch streams")
        self.spawn(self._watch_paths(), "watch batchers and routers")
        self.spawn(self._watch_cache(), "watch cache replicas")
        self.instances.start()
        self.registered.start()
        if self.settings.load_models:
            await self._load_repository_models()
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.http_port))
        except OSError as exc:
            sock.close()
            raise FatalError(f"cannot serve HTTP on {self.settings.host}:{self.settings.http_port}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off", loop="none",
            http=CoalescingHttpToolsProtocol,  # httptools, one write per response
            proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=int(self.settings.drain_timeout_s),
        )
        self._http = _EmbeddedServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise FatalError("HTTP server failed to start")
            await asyncio.sleep(0.01)
        self.log.info("HTTP on %s:%d, gRPC on %s:%d", self.settings.host, self.http_port, self.settings.host, self.grpc.port)

    async def on_drain(self, timeout_s: float) -> None:
        # Stop accepting HTTP connections and let in-flight HTTP requests finish (uvicorn waits for them).
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._http_task), timeout_s)
            except TimeoutError:
                self._http.force_exit = True
                await asyncio.gather(self._http_task, return_exceptions=True)
        await self.cache.wait_writes(min(timeout_s, 5.0))  # cache write-backs of answers already sent

    async def on_close(self) -> None:
        self.body_codec.close()
        await self.instances.stop()
        await self.registered.stop()
