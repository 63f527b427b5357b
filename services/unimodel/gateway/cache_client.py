"""The gateway's calls to the cache service (NATS request/reply on the cache subjects), and the chat
path's fail-open lookup: whatever goes wrong with the cache (service down, Milvus down, embedding model
not loaded, too slow), a chat request goes on to the model, marked "bypassed".

Cache replicas take requests as a NATS queue group: a replica that dies takes the requests it held with
it (core NATS does not redeliver). The gateway's path watch (core/path_watch.py) finds a replica gone and
calls `resend`: every call that waited since before is sent again, at most MAX_SENDS times in all. That
is safe for every call: queries and logs read, an insert of entries already stored refreshes them (no
duplicate: cache/store.py), a removal of what is gone removes nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from unimodel.core import errors, subjects, tracing
from unimodel.core.bus import Bus
from unimodel.core.context import RequestContext
from unimodel.core.tracing import Attr
from unimodel.v1 import cache_pb2, generate_pb2

log = logging.getLogger("unimodel.gateway.cache")

HIT, MISS, BYPASSED = "hit", "miss", "bypassed"


def verdict_name(verdict: int) -> str:
    """The verification stage's verdict as the JSON APIs show it: "accepted", "rejected", "" (did not run)."""
    if verdict == cache_pb2.CACHE_VERDICT_ACCEPTED:
        return "accepted"
    return "rejected" if verdict == cache_pb2.CACHE_VERDICT_REJECTED else ""


M = TypeVar("M", bound=Message)

_RESEND = "unimodel: cache replica gone"
"""Cancel message for a call whose replica may be gone: swallowed (uncancel), and the call sent again."""
MAX_SENDS = 3


@dataclass(slots=True)
class Lookup:
    outcome: str  # HIT, MISS or BYPASSED
    reply: cache_pb2.CacheQueryResponse | None = None
    reason: str = ""  # why it was bypassed


class CacheClient:
    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self._writes: set[asyncio.Task[None]] = set()
        self._waiting: dict[asyncio.Task[object], float] = {}  # calls waiting for a replica -> time.monotonic() sent

    async def _call(self, subject: str, request: Message, reply_type: type[M], ctx: RequestContext, timeout_s: float) -> M:
        task = asyncio.current_task()
        assert task is not None
        data = request.SerializeToString()
        sends = 0
        while True:
            sends += 1
            self._waiting[task] = time.monotonic()
            try:
                raw = await self.bus.request(subject, data, ctx, timeout_s=timeout_s)
            except asyncio.CancelledError as exc:
                if exc.args != (_RESEND,) or task.uncancel() != 0:
                    raise
                if sends >= MAX_SENDS:
                    raise errors.Unavailable(
                        f"the cache replicas stopped while holding this request ({sends} tries)", retry_after_s=1
                    ) from None
                continue
            finally:
                self._waiting.pop(task, None)
            return reply_type.FromString(raw)

    def oldest_wait(self) -> float | None:
        """When the call waiting longest was sent (time.monotonic()), or None."""
        return min(self._waiting.values(), default=None)

    def resend(self, before: float) -> int:
        """Send again every call waiting since before `before` (time.monotonic()): a cache replica that
        may have held it is gone. Returns how many."""
        stale = [task for task, since in self._waiting.items() if since < before]
        for task in stale:
            task.cancel(_RESEND)
        return len(stale)

    async def query(
        self, request: cache_pb2.CacheQueryRequest, ctx: RequestContext, timeout_s: float | None = None
    ) -> cache_pb2.CacheQueryResponse:
        return await self._call(
            subjects.CACHE_QUERY, request, cache_pb2.CacheQueryResponse, ctx, timeout_s or self.timeout_s
        )

    async def insert(self, request: cache_pb2.CacheInsertRequest, ctx: RequestContext) -> cache_pb2.CacheInsertResponse:
        """The answer is what was stored: the cache commits only while part of `ctx`'s deadline (its
        reply_margin_s) is left, so an error (DEADLINE_EXCEEDED included) means nothing was stored, and
        sending the same entries again (a retry) stores no duplicate."""
        # Inserts embed every entry: a bulk insert takes longer than a query.
        return await self._call(subjects.CACHE_INSERT, request, cache_pb2.CacheInsertResponse, ctx, ctx.timeout(600.0))

    async def remove(self, request: cache_pb2.CacheRemoveRequest, ctx: RequestContext) -> cache_pb2.CacheRemoveResponse:
        return await self._call(subjects.CACHE_REMOVE, request, cache_pb2.CacheRemoveResponse, ctx, ctx.timeout(60.0))

    async def log(self, request: cache_pb2.CacheLogRequest, ctx: RequestContext) -> cache_pb2.CacheLogResponse:
        return await self._call(subjects.CACHE_LOG, request, cache_pb2.CacheLogResponse, ctx, self.timeout_s)

    # the chat path ------------------------------------------------------------------------------------
    async def lookup(
        self, scope: cache_pb2.CacheScope, messages: list[generate_pb2.ChatMessage], ctx: RequestContext
    ) -> Lookup:
        """Never raises: a failure of any kind is a bypass."""
        request = cache_pb2.CacheQueryRequest(scope=scope, messages=messages)
        # its own (short) deadline, the request's id and trace
        lookup_ctx = RequestContext.new(
            self.timeout_s, request_id=ctx.request_id, traceparent=ctx.traceparent, tracestate=ctx.tracestate
        )
        span, lookup_ctx = tracing.start_in(
            tracing.Name.CACHE_LOOKUP, lookup_ctx, tracing.CLIENT,
            {Attr.MODEL: scope.model, Attr.MESSAGING_SYSTEM: "nats", Attr.MESSAGING_DESTINATION: subjects.CACHE_QUERY},
        )
        try:
            reply = await self.query(request, lookup_ctx)
        except errors.UnimodelError as exc:
            result = Lookup(BYPASSED, reason=f"{exc.code_name}: {exc.message}")
        except Exception as exc:  # never let the cache break a chat request
            log.warning("cache lookup failed: %s", exc)
            result = Lookup(BYPASSED, reason=type(exc).__name__)
        else:
            result = Lookup(HIT if reply.hit else MISS, reply)
        if span is not None:
            span.set_attribute(Attr.CACHE_OUTCOME, result.outcome)
            if result.reply is not None and result.outcome == HIT:
                span.set_attribute(Attr.CACHE_SIMILARITY, result.reply.similarity)
                span.set_attribute(Attr.CACHE_MATCH, "exact" if result.reply.exact else "semantic")
            tracing.finish(span)
        return result

    def write_back(self, scope: cache_pb2.CacheScope, messages: list[generate_pb2.ChatMessage], answer: str) -> None:
        """Store a completed answer in the background (the response does not wait for it)."""
        request = cache_pb2.CacheInsertRequest(scope=scope)
        request.entries.add(messages=messages, answer=answer)

        async def write() -> None:
            try:
                await self.insert(request, RequestContext.new(30.0))
            except Exception as exc:
                log.info("cache write-back skipped: %s", getattr(exc, "message", exc))

        task = asyncio.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def wait_writes(self, timeout_s: float) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout_s)
