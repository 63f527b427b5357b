"""cache runtime: the semantic cache (semantic.py) on the cache subjects, with its stores and its
embedding path.

Subjects (queue group "cache", so replicas share the load): subjects.CACHE_QUERY, CACHE_INSERT,
CACHE_REMOVE, CACHE_LOG take the cache.proto requests and answer the matching response, or error headers
(InvalidArgument for bad input, Unavailable when Milvus or the embedding path is down, DeadlineExceeded
when a write could not commit `reply_margin_s` before the caller's deadline: nothing was written).
Every request carries its caller's deadline (RequestContext, header Um-Deadline); lookups and writes honour
it (semantic.py).

Embeddings go through the batcher like every other request (subjects.batch(<embedding model>)): texts are
batched with the other callers' and run on an embedding-worker. Milvus is reached through pymilvus
(settings.milvus: a Milvus Lite file, the Milvus Lite server of `unimodel up`, or a standalone Milvus);
the entries and the hit log live in the scalar store: SQLite (one replica, the default) or, with
settings.store_url, PostgreSQL, which any number of replicas share (store_postgres.py). Hits are written
in batches (semantic.py, hits.py): every flush interval, sooner when flush_rows wait, and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg

from unimodel.cache.entries import EntryStore
from unimodel.cache.hits import HitBuffer
from unimodel.cache.metrics import CacheMetrics
from unimodel.cache.querytext import Turn
from unimodel.cache.semantic import VERDICT_ACCEPTED, Limits, Scope, SemanticCache
from unimodel.cache.settings import CacheSettings
from unimodel.cache.store import ScalarStore, StoreUnavailable
from unimodel.cache.store_postgres import PostgresStore
from unimodel.cache.store_sqlite import SqliteStore
from unimodel.cache.vectors import VectorIndex, VectorStoreError
from unimodel.cache.verifier import Verifier
from unimodel.core import errors, subjects, tracing
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import FatalError, Service
from unimodel.core.replies import ReplyMux
from unimodel.core.store import KeyValueStore
from unimodel.core.tracing import Attr
from unimodel.core.transport_security import CredentialsError, read_secret
from unimodel.core.value_arrays import embeddings_of, texts_value
from unimodel.v1 import cache_pb2, generate_pb2, inference_pb2

_traceparent: contextvars.ContextVar[str] = contextvars.ContextVar("cache_traceparent", default="")
"""The traceparent of the query being served (the embedding it needs is its child span)."""
_request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("cache_deadline", default=None)
"""The deadline (time.time()) of the request being served: its embedding requests carry it on."""

M = TypeVar("M", bound=Message)

RECLAIM_RETRY_S = 10.0
"""After a failed vector cleanup round (Milvus down), the next one waits this long."""


def turns_of(messages: Sequence[generate_pb2.ChatMessage]) -> list[Turn]:
    return [Turn(m.role, m.content) for m in messages]


def open_store(s: CacheSettings) -> ScalarStore:
    """The scalar store the settings name (not connected yet: its start() does that)."""
    if not s.store_url:
        return SqliteStore(EntryStore(s.sqlite_file, busy_timeout_s=s.sqlite_busy_timeout_s))
    password = read_secret(s.store_password, s.store_password_file, "PostgreSQL password")
    return PostgresStore(
        s.store_url, password=password, pool_size=s.store_pool_size, connect_timeout_s=s.store_connect_timeout_s,
        statement_timeout_s=s.store_timeout_s,
    )


def _deadline(ctx: RequestContext) -> float | None:
    """The request's deadline (the caller's, from the Um-Deadline header) in time.time() seconds."""
    return ctx.deadline_ms / 1000.0 if ctx.deadline_ms else None


class CacheService(Service):
    kind = "cache"
    settings: CacheSettings

    def __init__(self, settings: CacheSettings, store: KeyValueStore | None = None) -> None:
        super().__init__(settings, store)
        self.replies = ReplyMux(self.bus, self.id)
        self.m = CacheMetrics(self.metrics.registry)
        self.cache: SemanticCache | None = None
        self._reclaim_failing = False
        self._reclaim_after = 0.0  # loop time of the next cleanup round after a failed one
        self._flush_due = asyncio.Event()  # enough hits wait: flush before the interval ends
        self._flush_failing = False

    async def on_start(self) -> None:
        s = self.settings
        try:
            verifier = Verifier.load(Path(s.verifier_model) if s.verifier_model else None) if s.verify else None
        except (OSError, ValueError) as exc:
            raise FatalError(f"cannot load the cache verifier {s.verifier_model or '(packaged)'}: {exc}") from None
        limits = Limits(
            threshold_short=s.threshold_short, threshold_long=s.threshold_long, long_text_chars=s.long_text_chars,
            recall_short=s.recall_threshold_short, recall_long=s.recall_threshold_long,
            verify_threshold=s.verify_threshold, veto_threshold=s.veto_threshold,
            ambiguity_margin=s.ambiguity_margin, top_k=s.top_k, ttl_s=s.ttl_s,
            max_entries_per_scope=s.max_entries_per_scope, max_entries=s.max_entries,
            max_entries_per_tenant=s.max_entries_per_tenant,
            max_answer_bytes=s.max_answer_bytes, max_query_chars=s.max_query_chars,
            max_insert_entries=s.max_insert_entries, hit_log_keep=s.hit_log_keep, guard=s.guard,
            reply_margin_s=s.reply_margin_s,
        )
        where = s.store_url or s.sqlite_file
        try:
            entries = open_store(s)
            await entries.start()
        except (StoreUnavailable, CredentialsError) as exc:
            raise FatalError(f"cannot open the cache store: {exc}") from None
        except Exception as exc:
            raise FatalError(f"cannot open the cache store {where}: {exc}") from None
        vectors = VectorIndex(
            s.milvus, s.milvus_collection, s.embedding_dim, token=s.milvus_token, index_type=s.milvus_index,
            nlist=s.milvus_nlist, nprobe=s.milvus_nprobe,
        )
        self.cache = SemanticCache(
            entries, vectors, self._embed, limits, on_evict=lambda reason, n: self.m.evictions.labels(reason).inc(n),
            hits=HitBuffer(s.flush_rows, s.hit_buffer_rows), on_flush_due=self._flush_due.set, verifier=verifier,
        )
        self.m.entries.set(await self.cache.count())
        await self.replies.start()
        await self.bus.serve(subjects.CACHE_QUERY, self._on_query, queue=subjects.QUEUE_CACHE)
        await self.bus.serve(subjects.CACHE_INSERT, self._on_insert, queue=subjects.QUEUE_CACHE)
        await self.bus.serve(subjects.CACHE_REMOVE, self._on_remove, queue=subjects.QUEUE_CACHE)
        await self.bus.serve(subjects.CACHE_LOG, self._on_log, queue=subjects.QUEUE_CACHE)
        self.spawn(self._housekeeping(), "cache housekeeping")
        self.spawn(self._connect(vectors), "connect to Milvus")
        self.log.info("cache on Milvus %s (collection %s), store %s", s.milvus, s.milvus_collection, entries.describe())

    async def _connect(self, vectors: VectorIndex) -> None:
        """Reach Milvus once at start (the stores connect on first use anyway): an early warning."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, vectors.connect)
        except VectorStoreError as exc:  # serve anyway: lookups answer Unavailable until Milvus is back
            self.log.warning("%s; retrying on the next request", exc)

    # embeddings --------------------------------------------------------------------------------------
    async def _embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim], L2-normalised, from the embedding model through the batcher."""
        s = self.settings
        # Texts of similar length share a request: a batch is padded to its longest text, so sorting by
        # length first spares the model most of the padding of a bulk insert.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if len(texts) > s.embedding_batch else None
        ordered = [texts[i] for i in order] if order is not None else list(texts)
        chunks = [ordered[i : i + s.embedding_batch] for i in range(0, len(ordered), s.embedding_batch)]
        parts = await asyncio.gather(*(self._embed_chunk(c) for c in chunks))
        vectors = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if order is not None and vectors.shape[0] == len(texts):
            restored = np.empty_like(vectors)
            restored[np.asarray(order)] = vectors
            vectors = restored
        if vectors.shape != (len(texts), s.embedding_dim):
            raise errors.FailedPrecondition(
                f"embedding model {s.embedding_model!r} gave vectors of shape {list(vectors.shape)}; the cache "
                f"expects {s.embedding_dim} dimensions (set embedding_dim)"
            )
        return vectors

    async def _embed_chunk(self, texts: Sequence[str]) -> np.ndarray:
        s = self.settings
        item = inference_pb2.BatchItem(input=texts_value(texts), rows=len(texts))
        timeout_s = s.embedding_timeout_s * max(1.0, len(texts) / 8)  # a bulk chunk queues behind others
        deadline = _request_deadline.get()
        if deadline is not None:  # the caller's deadline goes on to the batcher (which drops expired items)
            timeout_s = min(timeout_s, deadline - time.time())
            if timeout_s <= 0:
                raise errors.DeadlineExceeded("deadline exceeded before the embedding")
        span, ctx = tracing.start_in(
            tracing.Name.CACHE_EMBED, RequestContext.new(timeout_s, traceparent=_traceparent.get()), tracing.CLIENT,
            {Attr.MODEL: s.embedding_model, Attr.BATCH_ROWS: len(texts)},
        )
        try:
            raw = await self.replies.request_item(
                subjects.batch(s.embedding_model), item, ctx, timeout_s=timeout_s,
                bundle_subject=subjects.bundle(s.embedding_model),
            )
        except errors.DeadlineExceeded as exc:
            tracing.finish(span, exc)
            raise errors.DeadlineExceeded(f"deadline exceeded during the embedding ({exc.message})") from None
        except errors.UnimodelError as exc:
            tracing.finish(span, exc)
            raise errors.Unavailable(
                f"embedding model {s.embedding_model!r}: {exc.message}", retry_after_s=exc.retry_after_s or 1
            ) from None
        tracing.finish(span)
        found = embeddings_of(inference_pb2.PredictResponse.FromString(raw).output)
        if found is None:
            raise errors.FailedPrecondition(f"model {s.embedding_model!r} is not a text-embedding model")
        return found[0]

    # handlers ----------------------------------------------------------------------------------------
    def _ready(self) -> SemanticCache:
        if self.cache is None:
            raise errors.Unavailable("the cache is starting", retry_after_s=1)
        return self.cache

    @staticmethod
    def _scope(scope: cache_pb2.CacheScope) -> Scope:
        if not scope.model:
            raise errors.InvalidArgument("scope.model is required", field="scope")
        if not subjects.is_valid_model_name(scope.model):
            raise errors.InvalidArgument(f"invalid scope.model {scope.model!r}", field="scope")
        return Scope(scope.model, scope.tenant)

    @staticmethod
    def _parse(message_type: type[M], data: bytes) -> M:
        try:
            return message_type.FromString(data)
        except DecodeError:
            raise errors.InvalidArgument(f"not a {message_type.DESCRIPTOR.name}") from None

    async def _on_query(self, msg: Msg, ctx: RequestContext) -> bytes:
        request = self._parse(cache_pb2.CacheQueryRequest, msg.data)
        cache = self._ready()
        span, ctx = tracing.start_in(tracing.Name.CACHE_QUERY, ctx, tracing.SERVER, {Attr.MODEL: request.scope.model})
        token = _traceparent.set(ctx.traceparent)  # the embedding request is the query span's child
        deadline_token = _request_deadline.set(_deadline(ctx))
        wall_ns, perf_ns = time.time_ns(), time.perf_counter_ns()
        try:
            result = await cache.query(
                self._scope(request.scope), turns_of(request.messages), threshold_short=request.threshold_short,
                threshold_long=request.threshold_long, exact_only=request.exact_only, deadline=_deadline(ctx),
            )
        except errors.UnimodelError as exc:
            tracing.finish(span, exc)
            if not isinstance(exc, errors.InvalidArgument):
                self.m.queries.labels("error").inc()
            raise
        finally:
            _traceparent.reset(token)
            _request_deadline.reset(deadline_token)
        if span is not None:
            outcome = "exact_hit" if result.exact else "semantic_hit" if result.hit else "miss"
            span.set_attribute(Attr.CACHE_OUTCOME, outcome)
            span.set_attribute(Attr.CACHE_SIMILARITY, result.best_similarity)
            if result.search_at_ns:  # the vector search, from the times the query measured
                begin = wall_ns + result.search_at_ns - perf_ns
                search = tracing.start(tracing.Name.CACHE_SEARCH, ctx.traceparent, tracing.CLIENT, {
                    "db.system.name": "milvus", "db.operation.name": "search",
                }, start_ns=begin)
                tracing.finish(search, end_ns=begin + result.search_ns)
            tracing.finish(span)
        self.m.queries.labels("exact_hit" if result.exact else "semantic_hit" if result.hit else "miss").inc()
        if result.rejected_by_guard:
            self.m.guard.inc(result.rejected_by_guard)
        if result.ambiguous:
            self.m.ambiguous.inc()
        if result.verdict:
            self.m.verified.labels("accepted" if result.verdict == VERDICT_ACCEPTED else "rejected").inc()
            self.m.stage.labels("verify").observe(result.verify_ns / 1e9)
        if result.embed_ns:
            self.m.stage.labels("embed").observe(result.embed_ns / 1e9)
            self.m.stage.labels("search").observe(result.search_ns / 1e9)
        self.m.stage.labels("total").observe(result.total_ns / 1e9)
        reply = cache_pb2.CacheQueryResponse(
            hit=result.hit, exact=result.exact, similarity=result.similarity, best_similarity=result.best_similarity,
            embed_ns=result.embed_ns, search_ns=result.search_ns, total_ns=result.total_ns,
            verdict=cache_pb2.CacheVerdict.ValueType(result.verdict), verify_score=result.verify_score,
        )
        if result.entry is not None:
            reply.entry_id, reply.hit_query, reply.answer = result.entry.id, result.entry.query, result.entry.answer
        return reply.SerializeToString()

    async def _on_insert(self, msg: Msg, ctx: RequestContext) -> bytes:
        request = self._parse(cache_pb2.CacheInsertRequest, msg.data)
        cache = self._ready()
        scope = self._scope(request.scope)
        token = _request_deadline.set(_deadline(ctx))
        try:
            result = await cache.insert(
                scope, [(turns_of(e.messages), e.answer) for e in request.entries], deadline=_deadline(ctx)
            )
        except errors.DeadlineExceeded:
            self.m.late_writes.labels("insert").inc()
            raise
        finally:
            _request_deadline.reset(token)
        self.m.inserts.inc(result.added)
        self.m.refreshed.inc(result.refreshed)
        self.m.entries.set(result.entries)
        return cache_pb2.CacheInsertResponse(ids=result.ids, evicted=result.evicted).SerializeToString()

    async def _on_remove(self, msg: Msg, ctx: RequestContext) -> bytes:
        request = self._parse(cache_pb2.CacheRemoveRequest, msg.data)
        cache = self._ready()
        scope = self._scope(request.scope)
        if not request.truncate and not request.ids:
            raise errors.InvalidArgument("nothing to remove: give ids, or truncate", field="id_list")
        try:
            removed = await cache.remove(scope, truncate=request.truncate, ids=list(request.ids), deadline=_deadline(ctx))
        except errors.DeadlineExceeded:
            self.m.late_writes.labels("remove").inc()
            raise
        self.m.entries.set(await cache.count())
        return cache_pb2.CacheRemoveResponse(removed=removed).SerializeToString()

    async def _on_log(self, msg: Msg, ctx: RequestContext) -> bytes:
        request = self._parse(cache_pb2.CacheLogRequest, msg.data)
        cache = self._ready()
        records = await cache.log(self._scope(request.scope), min(max(request.limit or 100, 1), 10_000))
        reply = cache_pb2.CacheLogResponse()
        for r in records:
            reply.records.add(
                time=r.time, hit=r.hit, exact=r.exact, similarity=r.similarity, entry_id=r.entry_id,
                query=r.query, latency_ms=r.latency_ms, model=r.model,
                verdict=cache_pb2.CacheVerdict.ValueType(r.verdict), verify_score=r.verify_score,
            )
        return reply.SerializeToString()

    # housekeeping ------------------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Every flush interval: the hit log and LRU times, the vectors nothing claims (first at start:
        the leftovers of a process that died inside an insert), and now and then the TTL sweep."""
        s = self.settings
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + s.sweep_interval_s
        first = True
        while True:
            if not first:
                try:  # the interval, or less when enough hits wait
                    await asyncio.wait_for(self._flush_due.wait(), s.flush_interval_s)
                except TimeoutError:
                    pass
            self._flush_due.clear()
            first = False
            cache = self.cache
            if cache is None:
                continue
            await self._flush(cache)
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + s.sweep_interval_s
                    if await cache.expire():
                        self.m.entries.set(await cache.count())
            except errors.UnimodelError as exc:
                self.log.warning("cache housekeeping: %s", exc.message)
            await self._reclaim(cache)

    async def _flush(self, cache: SemanticCache) -> None:
        """Write the buffered hits and hit log rows; a failure is logged (once until it works again) and
        counted, never answered to a request: the rows stay buffered for the next round (bounded)."""
        dropped = cache.hits.dropped
        try:
            written = await cache.flush()
        except errors.UnimodelError as exc:
            self.m.flush_failures.inc()
            if not self._flush_failing:
                self.log.warning("cache hit log write failed: %s; retrying every round", exc.message)
            self._flush_failing = True
        else:
            if written:
                self.m.log_rows.inc(written)
                self.m.flushes.inc()
            if self._flush_failing:
                self.log.info("cache hit log writes work again")
            self._flush_failing = False
        if cache.hits.dropped > dropped:
            self.m.log_dropped.inc(cache.hits.dropped - dropped)

    async def _reclaim(self, cache: SemanticCache) -> None:
        """Delete the vectors of evicted, removed and failed entries; a failure (Milvus down) is logged once
        and counted, and the next round tries again: it never reaches an insert's answer."""
        now = asyncio.get_running_loop().time()
        if now < self._reclaim_after:
            return
        try:
            while await cache.reclaim() >= 1000:  # a full batch: there may be more
                pass
        except errors.UnimodelError as exc:
            self.m.cleanup_failures.inc()
            self._reclaim_after = now + RECLAIM_RETRY_S  # spare a Milvus that is down a reconnect every round
            if not self._reclaim_failing:
                self.log.warning("cache vector cleanup: %s; retrying every %gs", exc.message, RECLAIM_RETRY_S)
            self._reclaim_failing = True
        else:
            if self._reclaim_failing:
                self.log.info("cache vector cleanup works again")
            self._reclaim_failing = False
        try:
            self.m.cleanup_pending.set(await cache.cleanup_pending())
        except errors.UnimodelError as exc:
            self.log.debug("cache vector cleanup count: %s", exc.message)

    async def on_close(self) -> None:
        if self.cache is not None:
            try:
                written = await self.cache.flush()
                self.m.log_rows.inc(written)
            except Exception as exc:
                self.log.warning("could not write the last hit log records: %s", exc)
            self.cache.close()
            self.cache.vectors.close()
            await self.cache.store.close()
