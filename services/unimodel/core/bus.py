"""NATS bus: connection with reconnect, protobuf request/reply, error headers, bounded handlers.

Handlers take the message and its RequestContext and return reply bytes (None: no reply from here,
someone else answers msg.reply), or raise a UnimodelError, which goes back as error headers (never a
traceback). Each message is handled in its own
task so one slow request never holds up the next; at most `max_inflight` run at once, beyond that the
caller gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from unimodel.core import errors, payload_limits, subjects
from unimodel.core.context import RequestContext
from unimodel.core.subjects import Header
from unimodel.core.telemetry import request_id_var
from unimodel.core.transport_security import NatsAuth

log = logging.getLogger("unimodel.bus")

Handler = Callable[[Msg, RequestContext], Awaitable[bytes | None]]


def _header_safe(text: str) -> str:
    return " ".join(text.split())[:512]


def error_headers(err: errors.UnimodelError) -> dict[str, str]:
    h = {Header.ERROR_CODE: err.code_name, Header.ERROR_MESSAGE: _header_safe(err.message)}
    if err.retry_after_s:
        h[Header.RETRY_AFTER] = f"{err.retry_after_s:g}"
    for key, value in err.metadata.items():  # e.g. the field or limit a 400 names
        h[Header.ERROR_META + key] = _header_safe(value)
    return h


def error_from_headers(headers: Mapping[str, str] | None) -> errors.UnimodelError | None:
    """The error an answer's headers carry (error_headers), or None for a plain answer."""
    code = headers.get(Header.ERROR_CODE) if headers else None
    if not code:
        return None
    assert headers is not None
    retry = headers.get(Header.RETRY_AFTER, "0")
    prefix = Header.ERROR_META
    meta = {k[len(prefix):]: v for k, v in headers.items() if k.startswith(prefix)} if len(headers) > 2 else {}
    return errors.from_code(code, headers.get(Header.ERROR_MESSAGE, ""), retry_after_s=float(retry or 0), **meta)


def raise_for_error_headers(msg: Msg) -> None:
    err = error_from_headers(msg.headers)
    if err is not None:
        raise err


CONNECTION_ERRORS = (
    nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError
)
"""nats-py errors of a send when the connection is down: answered UNAVAILABLE (connection_down()). Not
MaxPayloadError: a message over the server's max_payload is PAYLOAD_TOO_LARGE (oversized()), sent again it
fails again."""


def header_bytes(headers: Mapping[str, str] | None) -> int:
    """What `headers` add to a message as nats-py encodes them (NATS/1.0 line, `key: value` lines, blank line)."""
    if not headers:
        return 0
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def oversized(nc: NatsClient, size: int, what: str = "the request") -> errors.PayloadTooLarge:
    """PAYLOAD_TOO_LARGE for a message of `size` bytes that the server (its max_payload) does not take."""
    return payload_limits.too_large(size, nc.max_payload, what)


def connection_down() -> errors.Unavailable:
    return errors.Unavailable("NATS connection is down", retry_after_s=1)


def no_reply(subject: str, ctx: RequestContext) -> errors.UnimodelError:
    """The error for a request that got no answer in time: its deadline passed, or nobody answered."""
    if ctx.remaining_s() <= 0:
        return errors.DeadlineExceeded("deadline exceeded", request_id=ctx.request_id)
    return errors.Unavailable(f"no reply on {subject} in time", retry_after_s=1)


class NoResponders(errors.Unavailable):
    """NATS answered at once that nobody listens on the subject (no instance, or none subscribed yet)."""


def no_responders(subject: str) -> errors.Unavailable:
    return NoResponders(f"no instance is serving {subject}", retry_after_s=1)


class Bus:
    """One NATS connection of a service."""

    def __init__(
        self,
        servers: list[str],
        name: str,
        *,
        max_inflight: int = 1024,
        default_timeout_s: float = 30.0,
        auth: NatsAuth | None = None,
        inbox_prefix: str = "_INBOX",
    ):
        self.servers = servers
        self.name = name
        self.auth = auth or NatsAuth()
        self.inbox_prefix = inbox_prefix  # where answers to this connection's requests arrive
        self.max_inflight = max_inflight
        self.default_timeout_s = default_timeout_s
        self.nc: NatsClient | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_error_log = 0.0
        self._closing = False
        self.on_state: Callable[[bool], None] | None = None
        # after a reconnect (not the first connect): what was on its way may have been lost
        self.on_reconnect: Callable[[], None] | None = None
        self.reconnected_at: float | None = None  # time.monotonic() of the last reconnect; None: never

    # connection -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        """Connect, retrying until NATS answers (logged, at most one line every 5 s), with the
        credentials and TLS of `auth`; a refused authorization is retried the same way (logged)."""
        self.nc = await nats.connect(
            self.servers,
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            inbox_prefix=self.inbox_prefix,
            **self.auth.connect_options(),
        )
        log.info("connected to NATS %s", self.nc.connected_url.netloc if self.nc.connected_url else self.servers)
        if self.on_state:
            self.on_state(True)

    async def _on_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self._last_error_log = now
            log.warning("NATS %s unreachable or failing (%s); retrying", ",".join(self.servers), exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("disconnected from NATS; reconnecting")
        if self.on_state:
            self.on_state(False)

    async def _on_reconnected(self) -> None:
        self.reconnected_at = time.monotonic()
        log.info("reconnected to NATS %s", self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "")
        if self.on_state:
            self.on_state(True)
        if self.on_reconnect:
            self.on_reconnect()

    @property
    def max_payload(self) -> int:
        """The server's max_payload from its INFO (nats-py's 1 MiB default before the first connection)."""
        return self.nc.max_payload if self.nc is not None else 1024 * 1024

    @property
    def message_limit(self) -> int:
        """The largest item, bundle or reply this service publishes (payload_limits.message_limit)."""
        return payload_limits.message_limit(self.max_payload)

    def check_fits(self, payload: bytes, headers: Mapping[str, str] | None = None, what: str = "the request") -> None:
        """PAYLOAD_TOO_LARGE (raised) when `payload` with `headers` is over the server's max_payload: the
        server would refuse it and close the connection."""
        nc = self.nc
        if nc is not None:
            size = len(payload) + header_bytes(headers)
            if size > nc.max_payload:
                raise oversized(nc, size, what)

    def client(self) -> NatsClient:
        """The connected NATS client; Unavailable when there is none."""
        if self.nc is None or self.nc.is_closed:
            raise errors.Unavailable("not connected to NATS", retry_after_s=1)
        return self.nc

    # request side -----------------------------------------------------------------------------
    async def request(self, subject: str, payload: bytes, ctx: RequestContext, *, timeout_s: float) -> bytes:
        """Send a request and return the reply payload; error replies raise their UnimodelError."""
        nc = self.client()
        headers = ctx.to_headers()
        self.check_fits(payload, headers)
        try:
            msg = await nc.request(subject, payload, timeout=ctx.timeout(timeout_s), headers=headers)
        except nats.errors.MaxPayloadError:
            raise oversized(nc, len(payload)) from None
        except nats.errors.NoRespondersError:
            raise no_responders(subject) from None
        except nats.errors.TimeoutError:
            raise no_reply(subject, ctx) from None
        except CONNECTION_ERRORS:
            raise connection_down() from None
        raise_for_error_headers(msg)
        return msg.data

    async def responds(self, subject: str, timeout_s: float) -> bool | None:
        """Whether anyone answers on `subject`: True (an answer), False (NATS: no responders), None
        (no answer in time, or NATS itself unreachable: nothing is known)."""
        try:
            await self.client().request(subject, b"", timeout=timeout_s)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.TimeoutError, errors.Unavailable, *CONNECTION_ERRORS):
            return None
        return True

    def reconnect_age(self) -> float | None:
        """Seconds since this connection last reconnected (None: it never did), as `alive` answers carry it."""
        return None if self.reconnected_at is None else time.monotonic() - self.reconnected_at

    async def alive(self, instance_id: str, timeout_s: float) -> bool | float | None:
        """Whether the instance's process is still connected, asked on its liveness subject: True (it
        answered), a float (it answered, and reconnected to NATS that many seconds ago: with a NATS cluster
        a peer moves to another node when its node dies, and what was passing through the dead node is
        lost), False (NATS: no responders, the process is gone) or None (nothing is known)."""
        try:
            msg = await self.client().request(subjects.alive(instance_id), b"", timeout=timeout_s)
        except nats.errors.NoRespondersError:
            return False
        except (nats.errors.TimeoutError, errors.Unavailable, *CONNECTION_ERRORS):
            return None
        try:
            return float(msg.data) if msg.data else True
        except ValueError:
            return True

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> Subscription:
        """A plain subscription (e.g. for answers) that `stop_serving` leaves open: in-flight requests
        still get their replies while the service drains. It ends with the connection."""
        return await self.client().subscribe(subject, cb=cb, pending_msgs_limit=65536)

    # serving side -----------------------------------------------------------------------------
    async def serve(self, subject: str, handler: Handler, *, queue: str = "", inline: bool = False) -> Subscription:
        """Handle messages on `subject`. `inline=True` runs the handler in the subscription's own loop
        instead of a task per message: only for handlers that never wait on I/O (they would hold up the
        next message); saves a task switch per message."""
        nc = self.client()

        async def on_message(msg: Msg) -> None:
            if inline:
                await self._handle(msg, handler)
                return
            if len(self._tasks) >= self.max_inflight:
                await self._reply_error(msg, errors.ResourceExhausted("server busy", retry_after_s=0.1))
                return
            task = asyncio.create_task(self._handle(msg, handler))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        sub = await nc.subscribe(subject, queue=queue, cb=on_message, pending_msgs_limit=65536)
        self._subs.append(sub)
        return sub

    async def _handle(self, msg: Msg, handler: Handler) -> None:
        ctx = RequestContext.from_headers(msg.headers, self.default_timeout_s)
        token = request_id_var.set(ctx.request_id)
        try:
            ctx.check()
            reply = await handler(msg, ctx)
            if msg.reply and reply is not None:
                await self.publish(msg.reply, reply, what="the answer")
        except errors.UnimodelError as exc:
            await self._reply_error(msg, exc)
        except asyncio.CancelledError:
            await self._reply_error(msg, errors.Unavailable("server shutting down", retry_after_s=1))
            raise
        except Exception:
            log.exception("handler for %s failed", msg.subject)
            await self._reply_error(msg, errors.Internal("internal error"))
        finally:
            request_id_var.reset(token)

    async def _reply_error(self, msg: Msg, err: errors.UnimodelError) -> None:
        if msg.reply:
            await self.publish_error(msg.reply, err)

    async def publish(
        self, subject: str, payload: bytes, *, what: str = "the message", headers: dict[str, str] | None = None
    ) -> None:
        """One-way message (e.g. a result sent straight to a caller's inbox); PAYLOAD_TOO_LARGE (naming
        `what`) when it is over the server's max_payload."""
        nc = self.client()
        self.check_fits(payload, headers, what)
        try:
            await nc.publish(subject, payload, headers=headers)
        except nats.errors.MaxPayloadError:
            raise oversized(nc, len(payload), what) from None

    async def publish_error(self, subject: str, err: errors.UnimodelError) -> None:
        """Answer a caller's inbox with an error; logged, never raised, if NATS is down."""
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await self.nc.publish(subject, b"", headers=error_headers(err))
        except Exception as exc:  # the caller will time out; nothing else can be done here
            log.warning("could not send an error reply to %s: %s", subject, exc)

    # shutdown ---------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def stop_serving(self) -> None:
        """Stop taking new messages (in-flight handlers keep running)."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)
        self._subs.clear()
        if self.connected:
            try:
                await self.client().flush(timeout=1)
            except Exception as exc:
                log.debug("flush failed: %s", exc)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight handlers; cancel the rest after `timeout_s`. True when all finished."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        return not pending

    async def close(self) -> None:
        if self.nc is None:
            return
        nc, self.nc = self.nc, None
        self._closing = True
        try:
            if nc.is_connected:
                await asyncio.wait_for(nc.drain(), timeout=2.0)
        except Exception as exc:
            log.debug("NATS drain failed: %s", exc)
        finally:
            if not nc.is_closed:
                await nc.close()
