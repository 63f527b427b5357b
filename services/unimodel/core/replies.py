"""The answers to a service's batch-path requests, on one subscription, one by one or many per message.

nats-py's `request()` gives every request an inbox and resolves one future per reply message. On the
batch path a worker answers many requests of the same caller at once, so the caller here owns a reply
subject tree (subjects.replies(id)): `<replies>.<token>` is one request's inbox (128 random bits), and `<replies>.batch` takes
ReplyBatch messages, each holding the answers to several of its requests (BatchItem.reply_group). One
message per caller and batch instead of one per item: fewer publishes for the worker, fewer messages
for NATS to route and for the caller to parse.

Requests for one model made in the same event-loop iteration leave together, as one ItemBundle on the
model's bundle subject (a single request goes alone on its batch subject): one message for NATS to route
and the batcher to take instead of one per request. Requests with a trace context go alone (their trace
travels in headers).

Streamed answers (text generation) use an inbox too: `open_stream` publishes the item alone and
returns a ReplyStream that yields every message arriving at that inbox, in order, until the caller
closes it.

Requests are published with the inbox as reply subject (a bundle: its first request's inbox), so NATS
still answers "no responders" (status 503) at once when no batcher listens; for a bundle that answer fails
every request in it. Errors come as error headers on the inbox (batcher, worker) or as
ErrorDetail in a ReplyBatch. An answer for a request that already ended (timed out, or a batch retried
after a worker answered part of it) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Literal, NamedTuple, overload

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from unimodel.core import blobs, errors, payload_limits, subjects
from unimodel.core.blobs import Blobs
from unimodel.core.bus import CONNECTION_ERRORS, Bus, connection_down, error_from_headers, no_reply, no_responders
from unimodel.core.context import RequestContext
from unimodel.v1 import inference_pb2

log = logging.getLogger("unimodel.replies")

Encoded = bytes | bytearray | memoryview
"""An item encoded already (big ones: off the event loop, gateway/big_bodies.py)."""
Answer = bytes | inference_pb2.BlobRef
"""What a request's inbox receives: the encoded response, or the reference of one held by its worker."""

_NO_RESPONDERS = "503"
_STATUS = "Status"

NO_RESPONDERS_RETRY_S = 0.25
"""With ReplyMux.no_responders_wait_s set, a request NATS answered "no responders" is sent again this often."""


class ReplyMux:
    def __init__(self, bus: Bus, instance_id: str, blobs: Blobs | None = None) -> None:
        self.bus = bus
        self.blobs = blobs  # where big items are held while their request waits (core/blobs.py); None: sent whole
        self.prefix = subjects.replies(instance_id)
        self.group = subjects.reply_batch(instance_id)
        self._pending: dict[str, tuple[asyncio.Future[Answer], str]] = {}
        self._sub: Subscription | None = None
        # what leaves at the end of this loop iteration: (batch subject, bundle subject) -> [(item, inbox)]
        self._outbox: dict[tuple[str, str], list[tuple[bytes, str, dict[str, str] | None]]] = {}
        self._bundles: dict[str, list[str]] = {}  # a sent bundle's reply inbox (its first) -> every inbox
        self._flushes: set[asyncio.Task[None]] = set()
        self._streams: dict[str, ReplyStream] = {}
        # what each waiting request sent, to send it again if its batcher is gone: inbox -> Sent
        self._sent: dict[str, Sent] = {}
        # "no responders" (no batcher subscribed right now: all restarting, or moving to another node of a
        # NATS cluster) sends a request again every NO_RESPONDERS_RETRY_S for up to this long before it
        # fails with it (nothing was taken, so sending again is safe); 0: it fails at once
        self.no_responders_wait_s = 0.0
        self._no_responders_until: dict[str, float] = {}  # inbox -> when its retries end
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._streams)

    async def start(self) -> None:
        """Subscribe (after the bus connected). Not one of the bus's served subjects: answers keep
        arriving while the service drains."""
        if self._sub is None:
            self._sub = await self.bus.subscribe(f"{self.prefix}.*", self._on_message)

    @overload
    async def request_item(
        self, subject: str, item: inference_pb2.BatchItem | Encoded, ctx: RequestContext, *, timeout_s: float,
        bundle_subject: str = "", local_answer: Literal[False] = False,
    ) -> Encoded: ...

    @overload
    async def request_item(
        self, subject: str, item: inference_pb2.BatchItem | Encoded, ctx: RequestContext, *, timeout_s: float,
        bundle_subject: str = "", local_answer: bool,
    ) -> Encoded | inference_pb2.BlobRef: ...

    async def request_item(
        self,
        subject: str,
        item: inference_pb2.BatchItem | Encoded,
        ctx: RequestContext,
        *,
        timeout_s: float,
        bundle_subject: str = "",
        local_answer: bool = False,
    ) -> Encoded | inference_pb2.BlobRef:
        """Publish `item` on `subject` (with others of this loop iteration as one ItemBundle on
        `bundle_subject`, when given) and wait for its answer (the encoded response); error answers
        raise their UnimodelError. Sets the item's reply_to, reply_group, request id and deadline. `item` may
        come encoded (bytes-like: a big one, encoded off the event loop): those fields are appended to it then,
        or, when it is payload_limits.BLOB_BYTES or more and this mux has `blobs`, it is held there while the
        request waits and the item carries its reference. An answer held by reference is fetched here.
        With `local_answer`, such an answer this process can map from the worker's memory file is returned as its
        BlobRef instead, for the caller to read (e.g. in a helper process) and then call blobs.done.
        An item over the bus's message limit is refused (PAYLOAD_TOO_LARGE naming the limit), unsent."""
        nc = self.bus.client()
        if self._sub is None:
            await self.start()
        encoded: Encoded = b""
        if not isinstance(item, inference_pb2.BatchItem):  # protobuf merges appended fields into the message before them
            encoded, item = item, inference_pb2.BatchItem()
        held = ""
        if self.blobs is not None and len(encoded) >= payload_limits.BLOB_BYTES:
            payload_limits.check(len(encoded), self.bus.max_payload)
            ref = await self.blobs.hold(encoded, ttl_s=ctx.timeout(timeout_s) + 1)
            item.blob.CopyFrom(ref)
            held, encoded = ref.subject, b""
        inbox = self._address(item, ctx)
        item.reply_group = self.group
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[inbox] = (future, subject)
        data, headers = bytes(encoded) + item.SerializeToString() if encoded else item.SerializeToString(), ctx.trace_headers() or None
        self._sent[inbox] = Sent(time.monotonic(), subject, data, headers)
        try:
            payload_limits.check(len(data), self.bus.max_payload)
            # Request id, deadline and trace context travel in the item (the batcher reads them there), so
            # traced requests are bundled like the others.
            if bundle_subject:
                self._queue(subject, bundle_subject, data, inbox, headers)
            else:
                await nc.publish(subject, data, reply=inbox, headers=headers)
            answer = await asyncio.wait_for(future, ctx.timeout(timeout_s))
        except TimeoutError:
            raise no_reply(subject, ctx) from None
        except nats.errors.MaxPayloadError:
            raise payload_limits.too_large(len(data), self.bus.max_payload) from None
        except CONNECTION_ERRORS:
            raise connection_down() from None
        finally:
            self._pending.pop(inbox, None)
            self._bundles.pop(inbox, None)
            self._sent.pop(inbox, None)
            self._no_responders_until.pop(inbox, None)
            if held and self.blobs is not None:
                self.blobs.release(held)
        if isinstance(answer, inference_pb2.BlobRef):  # a big answer, held by the worker
            if local_answer and self.blobs is not None and self.blobs.same_host and blobs.can_open(answer):
                return answer
            return await blobs.fetch(
                self.bus, answer, timeout_s=ctx.timeout(timeout_s), what="the answer",
                same_host=self.blobs.same_host if self.blobs is not None else True,
            )
        return answer

    def oldest_wait(self) -> float | None:
        """time.monotonic() when the longest-waiting request was (last) sent; None when none waits."""
        return min((s.at for s in self._sent.values()), default=None)

    async def resend(self, before: float, max_sends: int = 3) -> int:
        """Send again, each alone on its batch subject with the same inbox, the requests still waiting that
        were (last) sent before `before` (time.monotonic()) and fewer than `max_sends` times: their batcher
        may be gone (core/path_watch.py). Whichever answer comes first is the request's; a later one finds
        no waiting request and is dropped. Returns how many were sent."""
        nc = self.bus.client()
        count = 0
        for inbox, sent in list(self._sent.items()):
            entry = self._pending.get(inbox)
            if sent.at >= before or sent.sends >= max_sends or entry is None or entry[0].done():
                continue
            self._sent[inbox] = sent._replace(at=time.monotonic(), sends=sent.sends + 1)
            try:
                await nc.publish(sent.subject, sent.data, reply=inbox, headers=sent.headers)
            except CONNECTION_ERRORS:
                break  # NATS is down: the requests fail as they would have
            count += 1
        return count

    def _address(self, item: inference_pb2.BatchItem, ctx: RequestContext) -> str:
        """A new inbox of ours as the item's reply_to, and the request's id, deadline, tenant and trace
        context in the item; returns the inbox."""
        # 128 random bits: the inbox is the capability to answer this request. Only the services on its
        # path see it; a NATS user that may publish into every reply tree (a worker) cannot guess another's.
        inbox = f"{self.prefix}.{os.urandom(16).hex()}"
        item.reply_to = inbox
        item.request_id = ctx.request_id
        item.deadline_unix_ms = ctx.deadline_ms
        if ctx.tenant:
            item.tenant = ctx.tenant
        if ctx.traceparent:
            item.trace_context.update(ctx.trace_headers())
        return inbox

    async def open_stream(self, subject: str, item: inference_pb2.BatchItem, ctx: RequestContext) -> ReplyStream:
        """Publish `item` on `subject` and return the stream of messages its inbox receives (the
        caller reads it with `next()` and must `close()` it). Sets reply_to, request id and deadline."""
        nc = self.bus.client()
        if self._sub is None:
            await self.start()
        inbox = self._address(item, ctx)
        data = item.SerializeToString()
        payload_limits.check(len(data), self.bus.max_payload)
        stream = ReplyStream(self, inbox, subject, ctx)
        self._streams[inbox] = stream
        try:
            await nc.publish(subject, data, reply=inbox, headers=ctx.trace_headers() or None)
        except nats.errors.MaxPayloadError:
            stream.close()
            raise payload_limits.too_large(len(data), self.bus.max_payload) from None
        except CONNECTION_ERRORS:
            stream.close()
            raise connection_down() from None
        return stream

    # bundles ------------------------------------------------------------------------------------
    def _queue(self, subject: str, bundle_subject: str, data: bytes, inbox: str, headers: dict[str, str] | None) -> None:
        if not self._outbox:
            task = asyncio.get_running_loop().create_task(self._flush())  # runs after this iteration's callers
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        self._outbox.setdefault((subject, bundle_subject), []).append((data, inbox, headers))

    async def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        limit = self.bus.message_limit
        for (subject, bundle_subject), queued in outbox.items():
            # bundles that each fit the bus's message limit; a big item (ALONE_BYTES) goes alone
            for run in payload_limits.chunks([len(data) for data, _i, _h in queued], limit, payload_limits.ALONE_BYTES):
                await self._send_bundle(subject, bundle_subject, [queued[i] for i in run])

    async def _send_bundle(
        self, subject: str, bundle_subject: str, entries: list[tuple[bytes, str, dict[str, str] | None]]
    ) -> None:
        inboxes = [inbox for _data, inbox, _headers in entries]
        err: errors.UnimodelError
        try:
            nc = self.bus.client()
            if len(entries) == 1:  # a lone item goes as itself, with its trace context in headers too
                data, inbox, headers = entries[0]
                await nc.publish(subject, data, reply=inbox, headers=headers)
            else:  # each bundled item carries its own trace context (BatchItem.trace_context)
                self._bundles[inboxes[0]] = inboxes
                bundle = inference_pb2.EncodedItemBundle(items=[d for d, _i, _h in entries]).SerializeToString()
                await nc.publish(bundle_subject, bundle, reply=inboxes[0])
            return
        except nats.errors.MaxPayloadError:  # request_item checked each item: not expected, never a 503
            err = payload_limits.too_large(sum(len(d) for d, _i, _h in entries), self.bus.max_payload)
        except errors.UnimodelError as exc:  # no connection (Bus.client)
            err = exc
        except Exception as exc:  # not sent: each request fails now rather than at its deadline
            err = errors.Unavailable(f"NATS connection is down ({type(exc).__name__})", retry_after_s=1)
        for inbox in inboxes:
            self._fail(inbox, err)

    def _fail(self, inbox: str, err: errors.UnimodelError) -> None:
        entry = self._pending.get(inbox)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(err)

    async def _on_message(self, msg: Msg) -> None:
        if msg.subject == self.group:
            self._on_batch(msg.data)
            return
        stream = self._streams.get(msg.subject)
        if stream is not None:
            stream._deliver(msg)
            return
        entry = self._pending.get(msg.subject)
        if entry is None or entry[0].done():
            return
        future, subject = entry
        headers = msg.headers
        if headers:
            if headers.get(_STATUS) == _NO_RESPONDERS:
                gone = no_responders(subject)
                inboxes = self._bundles.pop(msg.subject, None) or [msg.subject]
                later = [inbox for inbox in inboxes if self._may_send_again(inbox)]
                for inbox in inboxes:
                    if inbox not in later:
                        self._fail(inbox, gone)
                if later:
                    task = asyncio.get_running_loop().create_task(self._send_again(later))
                    self._retries.add(task)
                    task.add_done_callback(self._retries.discard)
                return
            err = error_from_headers(headers)
            if err is not None:
                future.set_exception(err)
                return
            blob = headers.get(subjects.Header.BLOB)
            if blob is not None:
                try:
                    future.set_result(blobs.answer_ref(blob))
                except errors.UnimodelError as exc:
                    future.set_exception(exc)
                return
        future.set_result(msg.data)

    def _may_send_again(self, inbox: str) -> bool:
        """Whether a request NATS answered "no responders" is sent again (no_responders_wait_s)."""
        if self.no_responders_wait_s <= 0 or inbox not in self._sent:
            return False
        now = time.monotonic()
        until = self._no_responders_until.setdefault(inbox, now + self.no_responders_wait_s)
        return now + NO_RESPONDERS_RETRY_S < until

    async def _send_again(self, inboxes: list[str]) -> None:
        """After NO_RESPONDERS_RETRY_S, each request still waiting alone on its batch subject, same inbox."""
        await asyncio.sleep(NO_RESPONDERS_RETRY_S)
        for inbox in inboxes:
            sent, entry = self._sent.get(inbox), self._pending.get(inbox)
            if sent is None or entry is None or entry[0].done():
                continue
            self._sent[inbox] = sent._replace(at=time.monotonic())
            try:
                await self.bus.client().publish(sent.subject, sent.data, reply=inbox, headers=sent.headers)
            except (errors.UnimodelError, *CONNECTION_ERRORS):
                self._fail(inbox, connection_down())

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


class Sent(NamedTuple):
    """A waiting request as it was sent (ReplyMux.resend)."""

    at: float  # time.monotonic() of the last send
    subject: str
    data: bytes
    headers: dict[str, str] | None
    sends: int = 1


class ReplyStream:
    """The messages arriving at one inbox, in arrival order (NATS keeps one publisher's order)."""

    __slots__ = ("_mux", "inbox", "subject", "ctx", "_queue", "_closed", "refused")

    def __init__(self, mux: ReplyMux, inbox: str, subject: str, ctx: RequestContext) -> None:
        self._mux = mux
        self.inbox = inbox
        self.subject = subject
        self.ctx = ctx
        self._queue: asyncio.Queue[bytes | errors.UnimodelError] = asyncio.Queue()
        self._closed = False
        # An error answer came (no responders, or the batcher or worker refused the request): nothing of
        # it runs anywhere, so there is nothing to abort.
        self.refused = False

    def _deliver(self, msg: Msg) -> None:
        headers = msg.headers
        if headers:
            if headers.get(_STATUS) == _NO_RESPONDERS:
                self.refused = True
                self._queue.put_nowait(no_responders(self.subject))
                return
            err = error_from_headers(headers)
            if err is not None:
                self.refused = True
                self._queue.put_nowait(err)
                return
        self._queue.put_nowait(msg.data)

    async def next(self, timeout_s: float) -> bytes:
        """The next message's data; its error raised; DEADLINE_EXCEEDED when none comes within
        `timeout_s` (or the request's deadline, whichever is first)."""
        queue = self._queue
        if queue.empty():
            try:
                item = await asyncio.wait_for(queue.get(), min(timeout_s, self.ctx.timeout(timeout_s)))
            except TimeoutError:
                raise no_reply(self.subject, self.ctx) from None
        else:
            item = queue.get_nowait()
        if isinstance(item, errors.UnimodelError):
            raise item
        return item

    def fail(self, err: errors.UnimodelError) -> None:
        """End the stream with `err` after what has arrived (the sender is known to be gone)."""
        if not self._closed:
            self._queue.put_nowait(err)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._mux._streams.pop(self.inbox, None)
