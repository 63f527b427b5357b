"""The semantic cache's logic: exact match, then vector similarity, inside one scope; inserts that are
all or nothing; eviction by TTL and by max entries (least recently used); the hit log.

Eviction never crosses tenants: an insert evicts only entries of the tenant that inserted, least recently
used first: over `max_entries_per_scope` in the scope, over `max_entries_per_tenant` in all of the
tenant's scopes (named tenants; the shared tenant "" of open mode and admins has no quota of its own),
and over `max_entries` in the whole store. So one tenant filling its quota, or the store, never removes
another tenant's entries; give every tenant its quota by keeping max_entries >= tenants x quota.

Transport-free: the service gives it the stores (entries.EntryStore, vectors.VectorIndex) and an
`embed(texts) -> float32 [n, dim]` coroutine (the embedding-worker, through the batcher). Blocking
store calls run on executors: SQLite on one thread, Milvus on a few.

A query:
  1. the conversation's text (querytext.query_text): ModelCache's splice, the text to embed, the exact key;
  2. exact-match fast path: the normalised text's hash in SQLite -> hit, similarity 1, no embedding;
  3. embed the text, search the scope's nearest `top_k` vectors in Milvus;
  4. the candidates at or above the threshold (short or long text) that still exist, are not expired and
     pass the guard (guard.py: a question and its opposite, other numbers or names, swapped sides);
  5. the best of them is the hit, unless another one with a different answer is within
     `ambiguity_margin` of it: two entries that match equally well but answer differently is a guess,
     so it is a miss (near-duplicate questions with different answers are common in real caches).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, TypeVarTuple

import numpy as np

from unimodel.cache import guard
from unimodel.cache.entries import Entry, EntryStore, LogRecord, NewEntry
from unimodel.cache.querytext import (
    QueryText,
    QueryTextError,
    Turn,
    embedding_text_of,
    query_text,
    scope_key,
    threshold_for,
)
from unimodel.cache.vectors import VectorIndex, VectorStoreError
from unimodel.core import errors

Embed = Callable[[Sequence[str]], Awaitable[np.ndarray]]
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True, slots=True)
class Limits:
    threshold_short: float = 0.94
    threshold_long: float = 0.87
    long_text_chars: int = 80
    ambiguity_margin: float = 0.02
    top_k: int = 4
    ttl_s: float = 0.0  # 0 = entries never expire
    max_entries_per_scope: int = 200_000
    max_entries: int = 2_000_000
    max_entries_per_tenant: int = 200_000  # named tenants; "" (open mode, admins) is bounded by max_entries
    max_answer_bytes: int = 256 * 1024
    max_query_chars: int = 32 * 1024
    max_insert_entries: int = 10_000
    hit_log_keep: int = 100_000
    guard: bool = True


@dataclass(frozen=True, slots=True)
class Scope:
    model: str
    tenant: str = ""

    @property
    def key(self) -> str:
        return scope_key(self.model, self.tenant)


@dataclass(slots=True)
class QueryResult:
    hit: bool = False
    exact: bool = False
    similarity: float = 0.0
    best_similarity: float = 0.0
    entry: Entry | None = None
    embed_ns: int = 0
    search_ns: int = 0
    search_at_ns: int = 0  # perf_counter_ns() when the vector search began (for its span)
    total_ns: int = 0
    rejected_by_guard: int = 0
    ambiguous: bool = False


@dataclass(slots=True)
class InsertResult:
    ids: list[int] = field(default_factory=list)
    evicted: int = 0
    entries: int = 0  # entries stored in all scopes afterwards


class SemanticCache:
    def __init__(
        self,
        entries: EntryStore,
        vectors: VectorIndex,
        embed: Embed,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[str, int], None] = lambda reason, n: None,
    ) -> None:
        self.entries, self.vectors, self.embed, self.limits = entries, vectors, embed, limits
        self.clock = clock
        self.on_evict = on_evict
        self._sql = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-sqlite")
        self._milvus = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cache-milvus")
        self._touches: dict[int, tuple[float, int]] = {}
        self._log: list[LogRecord] = []
        self._write_lock = asyncio.Lock()  # inserts, removals and evictions one at a time

    async def _sqlite(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._sql, fn, *args)

    async def _vector(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._milvus, fn, *args)
        except VectorStoreError as exc:
            raise errors.Unavailable(str(exc), retry_after_s=1) from None

    def _not_before(self) -> float:
        return self.clock() - self.limits.ttl_s if self.limits.ttl_s > 0 else 0.0

    def _text(self, turns: Sequence[Turn]) -> QueryText:
        total = sum(len(t.content) for t in turns)
        if total > self.limits.max_query_chars:
            raise errors.InvalidArgument(
                f"the query has {total} characters; the cache takes at most {self.limits.max_query_chars}",
                field="query",
            )
        try:
            return query_text(turns)
        except QueryTextError as exc:
            raise errors.InvalidArgument(str(exc), field="query") from None

    # query -------------------------------------------------------------------------------------------
    async def query(
        self, scope: Scope, turns: Sequence[Turn], *, threshold_short: float = 0.0, threshold_long: float = 0.0,
        exact_only: bool = False,
    ) -> QueryResult:
        started = time.perf_counter_ns()
        text = self._text(turns)
        result = QueryResult()
        key = scope.key
        not_before = self._not_before()
        entry = await self._sqlite(self.entries.exact, key, text.exact_key, not_before)
        if entry is not None:
            result.hit = result.exact = True
            result.similarity = result.best_similarity = 1.0
            result.entry = entry
        elif not exact_only:
            t0 = time.perf_counter_ns()
            vector = (await self.embed([text.embedding_text]))[0]
            t1 = time.perf_counter_ns()
            candidates = await self._vector(self.vectors.search, key, vector, self.limits.top_k)
            result.embed_ns, result.search_ns = t1 - t0, time.perf_counter_ns() - t1
            result.search_at_ns = t1
            threshold = threshold_for(
                text, threshold_short or self.limits.threshold_short, threshold_long or self.limits.threshold_long,
                self.limits.long_text_chars,
            )
            passing = [(i, s) for i, s in candidates if s >= threshold]
            result.best_similarity = candidates[0][1] if candidates else 0.0
            if passing:
                found = await self._sqlite(self.entries.get, key, [i for i, _ in passing], not_before)
                matches: list[tuple[Entry, float]] = []
                for entry_id, similarity in passing:
                    candidate = found.get(entry_id)
                    if candidate is None:
                        continue  # removed or expired since it was indexed
                    if self.limits.guard and not guard.compatible(text.embedding_text, embedding_text_of(candidate.query)):
                        result.rejected_by_guard += 1
                        continue
                    matches.append((candidate, similarity))
                if matches:
                    best, similarity = matches[0]
                    rival = next((m for m in matches[1:] if m[0].answer != best.answer), None)
                    if rival is not None and similarity - rival[1] < self.limits.ambiguity_margin:
                        result.ambiguous = True
                    else:
                        result.hit, result.similarity, result.entry = True, similarity, best
        result.total_ns = time.perf_counter_ns() - started
        now = self.clock()
        if result.entry is not None:
            at, n = self._touches.get(result.entry.id, (0.0, 0))
            self._touches[result.entry.id] = (max(at, now), n + 1)
        self._log.append(
            LogRecord(
                now, key, scope.model, text.spliced, result.hit, result.exact,
                result.similarity if result.hit else result.best_similarity,
                result.entry.id if result.entry else 0, result.total_ns / 1e6,
            )
        )
        return result

    # insert ------------------------------------------------------------------------------------------
    async def insert(self, scope: Scope, items: Sequence[tuple[Sequence[Turn], str]]) -> InsertResult:
        """Store every (conversation, answer), or none (an error is raised and nothing is written)."""
        limits = self.limits
        if not items:
            raise errors.InvalidArgument("nothing to insert (chat_info is empty)", field="chat_info")
        if len(items) > limits.max_insert_entries:
            raise errors.InvalidArgument(
                f"{len(items)} entries in one insert; at most {limits.max_insert_entries}", field="chat_info"
            )
        texts: list[QueryText] = []
        new: list[NewEntry] = []
        for i, (turns, answer) in enumerate(items):
            try:
                text = self._text(turns)
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"chat_info[{i}]: {exc.message}", field="chat_info") from None
            if not answer:
                raise errors.InvalidArgument(f"chat_info[{i}]: the answer is empty", field="answer")
            size = len(answer.encode())
            if size > limits.max_answer_bytes:
                raise errors.InvalidArgument(
                    f"chat_info[{i}]: the answer has {size} bytes; at most {limits.max_answer_bytes}", field="answer"
                )
            texts.append(text)
            new.append(NewEntry(text.exact_key, text.spliced, answer))
        vectors = await self.embed([t.embedding_text for t in texts])
        key = scope.key
        async with self._write_lock:
            ids = await self._sqlite(self.entries.begin_insert, key, scope.model, scope.tenant, new, self.clock())
            try:
                await self._vector(self.vectors.insert, ids, key, vectors)
            except BaseException:
                await self._sqlite(self.entries.rollback)
                raise
            await self._sqlite(self.entries.commit)
            evicted, entries = await self._evict_over_limit(key, scope.tenant)
        return InsertResult(ids, evicted, entries)

    async def _evict_over_limit(self, key: str, tenant: str) -> tuple[int, int]:
        """Evict least recently used entries of `tenant` (the inserter) over the limits; (evicted, entries
        left in all scopes). Never another tenant's entries."""
        limits = self.limits
        store = self.entries
        in_scope, in_tenant, total = await self._sqlite(
            lambda: (store.count(key), store.count_tenant(tenant) if tenant else 0, store.count())
        )
        evicted = 0
        over = in_scope - limits.max_entries_per_scope
        if over > 0:
            ids = await self._sqlite(store.least_recent, key, over)
            evicted += await self._drop(ids)
            self.on_evict("max_entries_per_scope", len(ids))
        over = in_tenant - evicted - limits.max_entries_per_tenant
        if tenant and over > 0:
            ids = await self._sqlite(store.least_recent_of_tenant, tenant, over)
            evicted += await self._drop(ids)
            self.on_evict("max_entries_per_tenant", len(ids))
        over = total - evicted - limits.max_entries
        if over > 0:  # the store is full: the inserter makes room among its own entries
            ids = await self._sqlite(store.least_recent_of_tenant, tenant, over)
            evicted += await self._drop(ids)
            self.on_evict("max_entries", len(ids))
        return evicted, total - evicted

    async def _drop(self, ids: Sequence[int]) -> int:
        """Vectors first (a vector without its entry is skipped by queries), then the entries."""
        if not ids:
            return 0
        await self._vector(self.vectors.delete, ids)
        return await self._sqlite(self.entries.delete, ids)

    # remove ------------------------------------------------------------------------------------------
    async def remove(self, scope: Scope, *, truncate: bool = False, ids: Sequence[int] = ()) -> int:
        key = scope.key
        async with self._write_lock:
            if truncate:
                existing = await self._sqlite(self.entries.scope_ids, key)
                await self._vector(self.vectors.delete_scope, key)
                return await self._sqlite(self.entries.delete, existing)
            mine = await self._sqlite(self.entries.ids_of, key, list(ids))
            return await self._drop(mine)

    # housekeeping ------------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write the hits (LRU order) and the hit log gathered since the last flush."""
        touches, self._touches = self._touches, {}
        records, self._log = self._log, []
        if touches:
            await self._sqlite(self.entries.touch, touches)
        if records:
            await self._sqlite(self.entries.log, records, self.limits.hit_log_keep)

    async def expire(self) -> int:
        """Drop entries older than the TTL (a batch per call)."""
        if self.limits.ttl_s <= 0:
            return 0
        async with self._write_lock:
            ids = await self._sqlite(self.entries.expired, self._not_before())
            n = await self._drop(ids)
        if ids:
            self.on_evict("ttl", len(ids))
        return n

    async def log(self, scope: Scope, limit: int) -> list[LogRecord]:
        await self.flush()
        return await self._sqlite(self.entries.recent_log, scope.key, limit)

    async def count(self, scope: Scope | None = None) -> int:
        return await self._sqlite(self.entries.count, scope.key if scope else None)

    def close(self) -> None:
        self._milvus.shutdown(wait=True, cancel_futures=True)
        self._sql.shutdown(wait=True, cancel_futures=True)

