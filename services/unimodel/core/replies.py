"""The answers to a service's batch-path requests, on one subscription, one by one or many per message.

nats-py's `request()` gives every request an inbox and resolves one future per reply message. On the
batch path a worker answers many requests of the same caller at once, so the caller here owns a reply
subject tree (subjects.replies(id)): `<replies>.<n>` is request n's inbox, and `<replies>.batch` takes
ReplyBatch messages, each holding the answers to several of its requests (BatchItem.reply_group). One
message per caller and batch instead of one per item: fewer publishes for the worker, fewer messages
for NATS to route and for the caller to parse.

Requests are published with the inbox as reply subject, so NATS still answers "no responders" (status
503) at once when no batcher listens. Errors come as error headers on the inbox (batcher, worker) or as
ErrorDetail in a ReplyBatch. An answer for a request that already ended (timed out, or a batch retried
after a worker answered part of it) is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from unimodel.core import errors, subjects
from unimodel.core.bus import Bus
from unimodel.core.context import RequestContext
from unimodel.core.subjects import Header
from unimodel.v1 import inference_pb2

log = logging.getLogger("unimodel.replies")

_NO_RESPONDERS = "503"
_STATUS = "Status"


class ReplyMux:
    def __init__(self, bus: Bus, instance_id: str) -> None:
        self.bus = bus
        self.prefix = subjects.replies(instance_id)
        self.group = subjects.reply_batch(instance_id)
        self._pending: dict[str, tuple[asyncio.Future[bytes], str]] = {}
        self._numbers = itertools.count(1)
        self._sub: Subscription | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Subscribe (after the bus connected). Not one of the bus's served subjects: answers keep
        arriving while the service drains."""
        if self._sub is None:
            self._sub = await self.bus.subscribe(f"{self.prefix}.*", self._on_message)

    async def request_item(
        self, subject: str, item: inference_pb2.BatchItem, ctx: RequestContext, *, timeout_s: float
    ) -> bytes:
        """Publish `item` on `subject` and wait for its answer (the encoded response); error answers
        raise their UnimodelError. Sets the item's reply_to, reply_group, request id and deadline."""
        nc = self.bus.client()
        if self._sub is None:
            await self.start()
        inbox = f"{self.prefix}.{next(self._numbers)}"
        item.reply_to = inbox
        item.reply_group = self.group
        item.request_id = ctx.request_id
        item.deadline_unix_ms = ctx.deadline_ms
        if ctx.traceparent:
            item.trace_context.update(ctx.trace_headers())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[inbox] = (future, subject)
        try:
            # Request id, deadline and trace context travel in the item; headers only for a trace,
            # so the batcher's batch message carries it on.
            await nc.publish(subject, item.SerializeToString(), reply=inbox, headers=ctx.trace_headers() or None)
            return await asyncio.wait_for(future, ctx.timeout(timeout_s))
        except TimeoutError:
            if ctx.remaining_s() <= 0:
                raise errors.DeadlineExceeded("deadline exceeded", request_id=ctx.request_id) from None
            raise errors.Unavailable(f"no reply on {subject} in time", retry_after_s=1) from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
            raise errors.Unavailable("NATS connection is down", retry_after_s=1) from None
        finally:
            self._pending.pop(inbox, None)

    async def _on_message(self, msg: Msg) -> None:
        if msg.subject == self.group:
            self._on_batch(msg.data)
            return
        entry = self._pending.get(msg.subject)
        if entry is None or entry[0].done():
            return
        future, subject = entry
        headers = msg.headers
        if headers:
            if headers.get(_STATUS) == _NO_RESPONDERS:
                future.set_exception(errors.Unavailable(f"no instance is serving {subject}", retry_after_s=1))
                return
            code = headers.get(Header.ERROR_CODE)
            if code:
                retry = headers.get(Header.RETRY_AFTER, "0")
                future.set_exception(
                    errors.from_code(code, headers.get(Header.ERROR_MESSAGE, ""), retry_after_s=float(retry or 0))
                )
                return
        future.set_result(msg.data)

    def _on_batch(self, data: bytes) -> None:
        try:
            batch = inference_pb2.ReplyBatch.FromString(data)
        except DecodeError:
            log.warning("dropped a reply batch that is not a ReplyBatch (%d bytes)", len(data))
            return
        pending = self._pending
        for reply in batch.replies:
            entry = pending.get(reply.reply_to)
            if entry is None or entry[0].done():
                continue
            if reply.HasField("error"):
                entry[0].set_exception(errors.from_proto(reply.error))
            else:
                entry[0].set_result(reply.response)
