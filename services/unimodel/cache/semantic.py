"""The semantic cache's logic: exact match, then vector similarity, inside one scope; inserts that are
all or nothing; eviction by TTL and by max entries (least recently used); the hit log.

Writes are exactly what the caller is told: an insert or removal commits only while at least
`reply_margin_s` of its deadline is left (so its answer reaches the caller before the caller gives up),
work that cannot finish by then is not started, and an insert that answers an error has stored nothing,
in SQLite or in Milvus (entries.py: ids reserved, vectors written, then one transaction that also evicts;
`reclaim` deletes the vectors nothing claims). A retried insert (the same question and answer in the same
scope) stores no second entry: it refreshes the stored one and answers its id.

Eviction never crosses tenants: an insert evicts only entries of the tenant that inserted, least recently
used first: over `max_entries_per_scope` in the scope, over `max_entries_per_tenant` in all of the
tenant's scopes (named tenants; the shared tenant "" of open mode and admins has no quota of its own),
and over `max_entries` in the whole store. So one tenant filling its quota, or the store, never removes
another tenant's entries; give every tenant its quota by keeping max_entries >= tenants x quota.

Transport-free: the service gives it the stores (a store.ScalarStore: SQLite for one replica, PostgreSQL
shared by replicas; vectors.VectorIndex) and an `embed(texts) -> float32 [n, dim]` coroutine (the
embedding-worker, through the batcher). Each scalar store call is a whole transaction; Milvus calls run
on a few threads. Deadlines are absolute `time.time()` seconds (the request's); `clock` (TTL, LRU times)
may be a test's.

Replicas keep no state of their own between requests but the hits not yet written (hits.HitBuffer: LRU
times, hit counts and hit log rows, written in batches every flush interval, or sooner when `flush_rows`
wait, and at shutdown): exact keys, entries, ids, LRU order and TTL are all in the shared store, so an
entry committed through one replica is found at once through any other.

A query:
  1. the conversation's text (querytext.query_text): ModelCache's splice, the text to embed, the exact key;
  2. exact-match fast path: the normalised text's hash in SQLite -> hit, similarity 1, no embedding;
  3. embed the text, search the scope's nearest `top_k` vectors in Milvus;
  4. the candidates at or above the recall floor (short or long text; the threshold itself when the
     verification stage is off) that still exist, are not expired, were asked in the same conversation
     (querytext.py: the system prompt and earlier turns) and pass the guard (guard.py: a question and its
     opposite, other numbers or names, swapped sides, a word replaced by its opposite);
  5. the verification stage (verifier.py, unless it is off): a model trained on labelled question pairs
     reads the query's last message and each candidate's together and gives the probability that they ask
     the same thing. A candidate at or above the similarity threshold is kept unless that probability is
     under `veto_threshold` (the model is sure it is another question); one between the recall floor and the
     threshold needs `verify_threshold`. So the stage adds the paraphrases a threshold cannot reach and
     takes away only what it is sure of (chosen on the QQP dev set: docs/benchmarks.md);
  6. the best of them (the highest verifier score; the highest similarity without the stage) is the hit,
     unless another one with a different answer is within `ambiguity_margin` of its similarity: two
     entries that match equally well but answer differently is a guess, so it is a miss (near-duplicate
     questions with different answers are common in real caches).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, TypeVarTuple

import numpy as np

from unimodel.cache import guard
from unimodel.cache.entries import EntryStore
from unimodel.cache.hits import HitBuffer
from unimodel.cache.querytext import (
    QueryText,
    QueryTextError,
    Turn,
    query_text,
    question_of,
    scope_key,
    threshold_for,
)
from unimodel.cache.store import (
    Changed,
    Committed,
    Entry,
    LogRecord,
    NewEntry,
    Quotas,
    ScalarStore,
    StoreUnavailable,
    TooLate,
)
from unimodel.cache.store_sqlite import SqliteStore
from unimodel.cache.vectors import VectorIndex, VectorStoreError
from unimodel.cache.verifier import Verifier
from unimodel.core import errors

Embed = Callable[[Sequence[str]], Awaitable[np.ndarray]]
T = TypeVar("T")
Ts = TypeVarTuple("Ts")
log = logging.getLogger("unimodel.cache.semantic")

RECLAIM_GRACE_S = 60.0
"""Reserved ids are reclaimed this long after their insert's deadline (which no commit can pass)."""
NO_DEADLINE_S = 600.0
"""The deadline of a write given none."""
INSERT_ATTEMPTS = 3
"""An insert planned again when entries it meant to refresh went away meanwhile, at most this often."""
NOTHING_WRITTEN = "; nothing was written"
VERDICT_NONE, VERDICT_ACCEPTED, VERDICT_REJECTED = 0, 1, 2
"""The verification stage's verdict (unimodel.v1.CacheVerdict): not run, accepted, rejected."""


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
    reply_margin_s: float = 0.5  # a write commits only with this much of its deadline left
    recall_short: float = 0.0  # with a verifier: the similarity a candidate needs to reach it (0: the threshold)
    recall_long: float = 0.0
    verify_threshold: float = 0.0  # probability a candidate under the threshold needs (0: the model's own threshold)
    veto_threshold: float = 0.0  # probability under which a candidate at or above the threshold is refused


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
    other_context: int = 0  # candidates of another conversation (earlier turns, system prompt)
    ambiguous: bool = False
    verdict: int = VERDICT_NONE
    verify_score: float = 0.0  # the verifier's score of the entry served, or of the best candidate it refused
    rejected_by_verifier: int = 0
    verify_ns: int = 0


@dataclass(slots=True)
class InsertResult:
    ids: list[int] = field(default_factory=list)
    evicted: int = 0
    entries: int = 0  # entries stored in all scopes afterwards
    added: int = 0  # new entries
    refreshed: int = 0  # entries already stored (a retried insert): refreshed, not stored twice


class SemanticCache:
    def __init__(
        self,
        entries: EntryStore | ScalarStore,
        vectors: VectorIndex,
        embed: Embed,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[str, int], None] = lambda reason, n: None,
        hits: HitBuffer | None = None,
        on_flush_due: Callable[[], None] = lambda: None,
        verifier: Verifier | None = None,
    ) -> None:
        """`entries`: the scalar store (an EntryStore is run as a SqliteStore); `on_flush_due` is called
        when enough hits wait to be written before the next flush interval; `verifier`: the verification
        stage (None: off, the similarity thresholds alone decide)."""
        self.entries, self.vectors, self.embed, self.limits = entries, vectors, embed, limits
        self.verifier = verifier
        self.verify_threshold = (limits.verify_threshold or verifier.threshold) if verifier is not None else 0.0
        self._own_store = isinstance(entries, EntryStore)
        self.store: ScalarStore = SqliteStore(entries) if isinstance(entries, EntryStore) else entries
        self.clock = clock
        self.on_evict = on_evict
        self.on_flush_due = on_flush_due
        self._milvus = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cache-milvus")
        self.hits = hits if hits is not None else HitBuffer()
        self._reclaiming = asyncio.Lock()

    async def _stored(self, work: Awaitable[T]) -> T:
        """A scalar store call; its failure as the error it answers (_store_error)."""
        try:
            return await work
        except BaseException as exc:
            raise _store_error(exc) from None

    async def _sqlite(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """A blocking call of an EntryStore given to the cache, on the SQLite store's threads."""
        if isinstance(self.store, SqliteStore):
            return await self._stored(self.store.run(fn, *args))
        return await self._stored(asyncio.to_thread(fn, *args))

    async def _final(self, work: Awaitable[T]) -> T:
        """A write whose outcome is the caller's answer (a commit): once started it runs to its end even
        if the caller is cancelled meanwhile, and its outcome, not the cancellation, is the answer (a
        cancelled caller told "failed" after its entries were committed is what this prevents)."""
        future = asyncio.ensure_future(work)
        swallowed = 0
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.done():
                    swallowed += 1
            except BaseException:
                break
        task = asyncio.current_task()
        if swallowed and task is not None:
            for _ in range(swallowed):
                task.uncancel()
            log.info("a cache write was cancelled while it committed; it finished and answers as it ended")
        try:
            return future.result()
        except BaseException as exc:
            raise _store_error(exc) from None

    async def _vector(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._milvus, fn, *args)
        except VectorStoreError as exc:
            raise errors.Unavailable(str(exc), retry_after_s=1) from None

    def _commit_by(self, deadline: float | None) -> float | None:
        """The latest time.time() a write of `deadline` may commit (its answer needs the margin to arrive)."""
        return None if deadline is None else deadline - self.limits.reply_margin_s

    @staticmethod
    def _check(commit_by: float | None, what: str) -> None:
        """Work that cannot finish before the deadline is not started."""
        if commit_by is not None and time.time() >= commit_by:
            raise errors.DeadlineExceeded(f"deadline exceeded before {what}{NOTHING_WRITTEN}")

    @staticmethod
    async def _within(finish_by: float | None, what: str, work: Awaitable[T], note: str = "") -> T:
        """`work`, given up at `finish_by` (DeadlineExceeded, its message ending with `note`)."""
        try:
            if finish_by is None:
                return await work
            return await asyncio.wait_for(work, max(0.0, finish_by - time.time()))
        except TimeoutError:
            raise errors.DeadlineExceeded(f"deadline exceeded during {what}{note}") from None
        except errors.DeadlineExceeded as exc:
            raise errors.DeadlineExceeded(f"{exc.message}{note}") from None

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
        exact_only: bool = False, deadline: float | None = None,
    ) -> QueryResult:
        """`deadline` (time.time()): the embedding and the search are not started, or are given up, past it."""
        started = time.perf_counter_ns()
        text = self._text(turns)
        result = QueryResult()
        key = scope.key
        not_before = self._not_before()
        entry = await self._stored(self.store.exact(key, text.exact_key, not_before))
        if entry is not None:
            result.hit = result.exact = True
            result.similarity = result.best_similarity = 1.0
            result.entry = entry
        elif not exact_only:
            if deadline is not None and time.time() >= deadline:
                raise errors.DeadlineExceeded("deadline exceeded before the cache lookup's embedding")
            t0 = time.perf_counter_ns()
            vector = (await self._within(deadline, "the cache lookup's embedding", self.embed([text.embedding_text])))[0]
            t1 = time.perf_counter_ns()
            stored: dict[int, np.ndarray] = {}  # entry id -> its vector, when the verifier reads them
            if self.verifier is not None and self.verifier.needs_vectors:
                found_vectors = await self._vector(self.vectors.search_vectors, key, vector, self.limits.top_k)
                candidates = [(i, similarity) for i, similarity, _ in found_vectors]
                stored = {i: v for i, _, v in found_vectors}
            else:
                candidates = await self._vector(self.vectors.search, key, vector, self.limits.top_k)
            result.embed_ns, result.search_ns = t1 - t0, time.perf_counter_ns() - t1
            result.search_at_ns = t1
            limits = self.limits
            threshold = threshold_for(
                text, threshold_short or limits.threshold_short, threshold_long or limits.threshold_long, limits.long_text_chars
            )
            floor = threshold
            if self.verifier is not None:
                floor = min(threshold, threshold_for(
                    text, limits.recall_short or threshold, limits.recall_long or threshold, limits.long_text_chars
                ))
            passing = [(i, s) for i, s in candidates if s >= floor]
            result.best_similarity = candidates[0][1] if candidates else 0.0
            if passing:
                found = await self._stored(self.store.get(key, [i for i, _ in passing], not_before))
                matches: list[tuple[Entry, float]] = []
                questions: dict[int, str] = {}  # entry id -> its last message (what guard and verifier compare)
                for entry_id, similarity in passing:
                    candidate = found.get(entry_id)
                    if candidate is None:
                        continue  # removed or expired since it was indexed
                    question, context = question_of(candidate.query)
                    if context != text.context_key:  # another conversation or system prompt
                        result.other_context += 1
                        continue
                    if self.limits.guard and not guard.compatible(text.question, question):
                        result.rejected_by_guard += 1
                        continue
                    matches.append((candidate, similarity))
                    questions[candidate.id] = question
                if matches and self.verifier is not None:
                    matches = self._verified(text.question, vector, matches, questions, stored, threshold, result)
                if matches:
                    best, similarity = matches[0]
                    rival = next((m for m in matches[1:] if m[0].answer != best.answer), None)
                    if rival is not None and abs(similarity - rival[1]) < self.limits.ambiguity_margin:
                        result.ambiguous = True
                    else:
                        result.hit, result.similarity, result.entry = True, similarity, best
        result.total_ns = time.perf_counter_ns() - started
        now = self.clock()
        self.hits.add(
            LogRecord(
                now, key, scope.model, text.spliced, result.hit, result.exact,
                result.similarity if result.hit else result.best_similarity,
                result.entry.id if result.entry else 0, result.total_ns / 1e6, result.verdict, result.verify_score,
            ),
            result.entry.id if result.entry is not None else None, now,
        )
        if self.hits.due:
            self.on_flush_due()
        return result

    def _verified(
        self, query: str, vector: np.ndarray, matches: list[tuple[Entry, float]], questions: dict[int, str],
        stored: dict[int, np.ndarray], threshold: float, result: QueryResult,
    ) -> list[tuple[Entry, float]]:
        """The candidates the verifier lets through, its most confident first (those at or above the similarity
        `threshold` unless it vetoes them, the others if it accepts them); the verdict and score in `result`.
        `questions`, `stored`: the candidates' last messages and vectors (when the verifier reads them) by entry id."""
        verifier = self.verifier
        assert verifier is not None
        t0 = time.perf_counter_ns()
        texts = [questions[entry.id] for entry, _ in matches]
        cosines = np.array([similarity for _, similarity in matches], dtype=np.float32)
        vectors = np.stack([stored[entry.id] for entry, _ in matches]) if verifier.needs_vectors else None
        scores = verifier.score(query, vector, texts, vectors, cosines)
        result.verify_ns = time.perf_counter_ns() - t0
        order = sorted(range(len(matches)), key=lambda i: -float(scores[i]))
        veto = self.limits.veto_threshold
        accepted = [
            i for i in order if scores[i] >= (veto if matches[i][1] >= threshold else self.verify_threshold)
        ]
        result.rejected_by_verifier = len(matches) - len(accepted)
        top = accepted[0] if accepted else order[0]
        result.verdict = VERDICT_ACCEPTED if accepted else VERDICT_REJECTED
        result.verify_score = float(scores[top])
        return [matches[i] for i in accepted]

    # insert ------------------------------------------------------------------------------------------
    async def insert(
        self, scope: Scope, items: Sequence[tuple[Sequence[Turn], str]], *, deadline: float | None = None
    ) -> InsertResult:
        """Store every (conversation, answer), or none (an error is raised and nothing is written, in either
        store). `deadline` (time.time()): it commits `reply_margin_s` before it at the latest, else
        DeadlineExceeded. A (conversation, answer) the scope already holds is refreshed, not stored again:
        its id is answered (a client's retry adds nothing)."""
        limits = self.limits
        if not items:
            raise errors.InvalidArgument("nothing to insert (chat_info is empty)", field="chat_info")
        if len(items) > limits.max_insert_entries:
            raise errors.InvalidArgument(
                f"{len(items)} entries in one insert; at most {limits.max_insert_entries}", field="chat_info"
            )
        unique: dict[tuple[str, str], int] = {}  # (exact key, answer) -> position in `new`
        texts: list[QueryText] = []
        new: list[NewEntry] = []
        positions: list[int] = []  # item -> its position in `new`
        for i, (turns, answer) in enumerate(items):
            try:
                text = self._text(turns)
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"chat_info[{i}]: {exc.message}", field="chat_info") from None
            if not answer:
                raise errors.InvalidArgument(f"chat_info[{i}]: the answer is empty", field="answer")
            if "\x00" in answer:  # PostgreSQL's text cannot hold it; refused by every store alike
                raise errors.InvalidArgument(f"chat_info[{i}]: the answer holds a NUL character", field="answer")
            size = len(answer.encode())
            if size > limits.max_answer_bytes:
                raise errors.InvalidArgument(
                    f"chat_info[{i}]: the answer has {size} bytes; at most {limits.max_answer_bytes}", field="answer"
                )
            pair = (text.exact_key, answer)
            if pair not in unique:  # the same question and answer twice in one insert: one entry
                unique[pair] = len(new)
                texts.append(text)
                new.append(NewEntry(text.exact_key, text.spliced, answer))
            positions.append(unique[pair])
        commit_by = self._commit_by(deadline)
        self._check(commit_by, "the insert")
        key = scope.key
        stored = await self._stored(self.store.stored(key, list(unique)))
        for _attempt in range(INSERT_ATTEMPTS):
            todo = [i for i, e in enumerate(new) if (e.exact_key, e.answer) not in stored]
            try:
                committed = await self._insert_once(scope, new, [texts[i] for i in todo], todo, deadline, commit_by)
            except Changed as exc:  # entries it meant to refresh went away: embed those too
                for i in exc.positions:
                    stored.pop((new[i].exact_key, new[i].answer), None)
                continue
            for reason, ids in committed.evicted.items():
                self.on_evict(reason, len(ids))
            return InsertResult(
                [committed.ids[p] for p in positions], sum(len(v) for v in committed.evicted.values()),
                committed.entries, committed.added, committed.refreshed,
            )
        raise errors.Unavailable("the cache's entries changed during the insert; nothing was written", retry_after_s=1)

    async def _insert_once(
        self, scope: Scope, new: list[NewEntry], texts: list[QueryText], todo: list[int], deadline: float | None,
        commit_by: float | None,
    ) -> Committed:
        """One try: embed and write the vectors of `todo` (positions in `new` not stored yet) under reserved
        ids, then the one transaction. On any failure the reserved ids are given up (reclaim deletes their
        vectors)."""
        limits = self.limits
        quotas = Quotas(limits.max_entries_per_scope, limits.max_entries_per_tenant, limits.max_entries)
        vector_ids: dict[int, int] = {}
        if todo:
            self._check(commit_by, "the insert's embedding")
            vectors = await self._within(
                commit_by, "the insert's embedding", self.embed([t.embedding_text for t in texts]), NOTHING_WRITTEN
            )
            self._check(commit_by, "the insert's vectors were written")
            until = (deadline if deadline is not None else time.time() + NO_DEADLINE_S) + RECLAIM_GRACE_S
            ids = await self._stored(self.store.reserve(len(todo), until, commit_by))
            vector_ids = dict(zip(todo, ids, strict=True))
        try:
            if vector_ids:
                await self._vector(self.vectors.insert, list(vector_ids.values()), scope.key, vectors)
                self._check(commit_by, "the insert could commit")
            return await self._final(self.store.commit_insert(
                scope.key, scope.model, scope.tenant, new, vector_ids, self.clock(), quotas, commit_by,
            ))
        except BaseException as exc:
            # cancelled: the Milvus write may still run on its thread, so the ids wait for their grace
            if vector_ids and not isinstance(exc, asyncio.CancelledError):
                try:
                    await self._stored(self.store.release(list(vector_ids.values())))
                except BaseException as exc:  # reclaimed after the deadline's grace anyway
                    log.debug("could not release reserved ids: %s", exc)
            raise

    # remove ------------------------------------------------------------------------------------------
    async def remove(
        self, scope: Scope, *, truncate: bool = False, ids: Sequence[int] = (), deadline: float | None = None
    ) -> int:
        """Remove entries of `scope` (all of them with `truncate`): one transaction, committed before the
        deadline's margin or not at all; their vectors go by `reclaim`."""
        commit_by = self._commit_by(deadline)
        self._check(commit_by, "the removal")
        return await self._final(self.store.remove(scope.key, list(ids), truncate, commit_by))

    # housekeeping ------------------------------------------------------------------------------------
    async def flush(self) -> int:
        """Write the hits (LRU order) and the hit log gathered since the last flush, a statement each; the
        number of log rows written. When the store refuses them they go back to the buffer (the next flush
        tries again) and the error is raised."""
        batch = self.hits.take()
        if not batch:
            return 0
        try:
            if batch.touches:
                await self._stored(self.store.touch(batch.touches))
                batch.touches = {}
            if batch.records:
                await self._stored(self.store.log(batch.records, self.limits.hit_log_keep))
        except BaseException:
            self.hits.put_back(batch)
            raise
        return len(batch.records)

    async def expire(self) -> int:
        """Drop entries older than the TTL (a batch per call); their vectors go by `reclaim`."""
        if self.limits.ttl_s <= 0:
            return 0
        n = await self._stored(self.store.expire(self._not_before()))
        if n:
            self.on_evict("ttl", n)
        return n

    async def reclaim(self, limit: int = 1000) -> int:
        """Delete from Milvus the vectors whose entries are gone or were never committed (entries.py);
        the number of ids done. Unavailable when Milvus is down (they stay listed: the next call)."""
        async with self._reclaiming:
            now = time.time()
            ids = await self._stored(self.store.reclaimable(now, limit))
            if ids:
                await self._vector(self.vectors.delete, ids)
                await self._stored(self.store.forget(ids, now))
            return len(ids)

    async def cleanup_pending(self) -> int:
        return await self._stored(self.store.cleanup_pending())

    async def log(self, scope: Scope, limit: int) -> list[LogRecord]:
        """The newest hit log rows of `scope` (this replica's pending ones written first; other replicas'
        within their flush interval)."""
        try:
            await self.flush()
        except errors.UnimodelError as exc:  # they stay buffered for the next round; the log is read anyway
            log.debug("hit log rows not written before the read: %s", exc.message)
        return await self._stored(self.store.recent_log(scope.key, limit))

    async def count(self, scope: Scope | None = None) -> int:
        return await self._stored(self.store.count(scope.key if scope else None))

    def close(self) -> None:
        """Stop the threads (the stores are closed by their owner; an EntryStore given to the cache keeps
        its connections until its own close())."""
        self._milvus.shutdown(wait=True, cancel_futures=True)
        if self._own_store and isinstance(self.store, SqliteStore):
            self.store.shutdown_threads()


def _store_error(exc: BaseException) -> BaseException:
    """The error a scalar store call's failure answers: TooLate -> DeadlineExceeded, a locked, failing or
    unreachable store -> Unavailable (nothing written either way: every call is a whole transaction)."""
    if isinstance(exc, TooLate):
        return errors.DeadlineExceeded(f"{exc}{NOTHING_WRITTEN}")
    if isinstance(exc, StoreUnavailable):
        return errors.Unavailable(str(exc), retry_after_s=1)
    return exc

