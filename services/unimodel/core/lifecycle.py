"""Service lifecycle: start, run until SIGTERM/SIGINT, then leave etcd, drain in-flight work, close.

Stop order (Dynamo / vLLM habit): health NOT_SERVING -> revoke the etcd lease (peers stop routing here)
-> short grace -> stop taking NATS messages -> finish in-flight work within `drain_timeout_s` -> close
connections. Signal handlers only set state. `stop()` is idempotent and safe to call concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar

import grpc
from nats.aio.msg import Msg

from unimodel import __version__
from unimodel.core import subjects
from unimodel.core.bus import Bus
from unimodel.core.grpc_server import GrpcServer
from unimodel.core.membership import Registration, instance_key
from unimodel.core.settings import CommonSettings, SettingsError, load_settings
from unimodel.core.store import EtcdStore, KeyValueStore
from unimodel.core.telemetry import Metrics, ServiceState, setup_logging, setup_tracing
from unimodel.core.transport_security import CredentialsError
from unimodel.v1 import registry_pb2

log = logging.getLogger("unimodel.lifecycle")

LEAVE_GRACE_S = 0.2
"""Pause between revoking the lease and closing subscriptions, so watchers see us leave first."""


class FatalError(Exception):
    """The service cannot go on; the message is one line for the operator."""


class Service:
    kind: ClassVar[str] = "service"

    def __init__(self, settings: CommonSettings, store: KeyValueStore | None = None) -> None:
        self.settings = settings
        self.id = settings.instance_id
        self.log = logging.getLogger(f"unimodel.{self.kind}")
        self.bus = Bus(
            settings.nats_servers,
            name=self.id,
            max_inflight=settings.max_inflight,
            default_timeout_s=settings.request_timeout_s,
            auth=settings.nats_auth(),
            inbox_prefix=subjects.inbox_prefix(self.kind, self.id),
        )
        self.store: KeyValueStore = store or EtcdStore(settings.etcd_endpoint_list, auth=settings.etcd_auth())
        self.grpc = GrpcServer(
            settings.host, settings.grpc_port, int(getattr(settings, "max_body_bytes", 64 * 1024 * 1024)),
            interceptors=self.grpc_interceptors(),
        )
        self.metrics = Metrics()
        self.registration: Registration | None = None
        self.metrics.registry.register(ServiceState(
            self.kind, self.id, __version__, lambda: self.bus.connected,
            lambda: self.registration is not None and self.registration.registered.is_set(), lambda: self.bus.inflight,
        ))
        self.started_ms = int(time.time() * 1000)
        self._stop_requested = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fatal: BaseException | None = None
        self._health_gap: str | None = None  # readiness_gap() as last seen (None: not started); "" is ready
        self._health_published: bool | None = None
        self._health_task: asyncio.Task[None] | None = None

    # hooks for subclasses -----------------------------------------------------------------------
    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors of the service's gRPC server (e.g. the gateway's API keys); called in __init__,
        after `self.settings` is set."""
        return []

    async def on_start(self) -> None:
        """Subscribe, start discovery, load engines. NATS is connected; etcd may not be yet."""

    def readiness_gap(self) -> str:
        """Why this instance is not ready for requests yet ("" when it is): its gRPC health status, which
        Kubernetes' readinessProbe reads. Ready once started, unless a service says otherwise (a worker: while
        the models placed on it are not loaded). A service calls `refresh_health()` when the answer may change."""
        return ""

    async def on_drain(self, timeout_s: float) -> None:
        """Finish service-specific in-flight work (bus handlers are drained by the base class)."""

    async def on_close(self) -> None:
        """Release service resources (engines, HTTP servers)."""

    def instance_info(self) -> registry_pb2.InstanceInfo:
        return registry_pb2.InstanceInfo(
            id=self.id,
            kind=self.kind,
            version=__version__,
            host=socket.gethostname(),
            grpc_address=f"{self.settings.advertise_host}:{self.grpc.port}",
            started_unix_ms=self.started_ms,
            pid=os.getpid(),
        )

    async def _on_alive(self, msg: Msg) -> None:
        """Empty, or, once the connection reconnected, the seconds since (Bus.alive)."""
        if msg.reply:
            age = self.bus.reconnect_age()
            with contextlib.suppress(Exception):  # the caller gave up or NATS went away: nothing to do
                await msg.respond(b"" if age is None else f"{age:.3f}".encode())

    def update_registration(self) -> None:
        if self.registration is not None:
            self.registration.update(self.instance_info().SerializeToString())

    # background tasks ---------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task; if it dies unexpectedly, the service stops with that error."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self._fatal is None:
                self._fatal = t.exception()
                log.error("background task %s failed: %s", name, t.exception(), exc_info=t.exception())
                self.request_stop()

        task.add_done_callback(done)
        return task

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.grpc.start()
        except (OSError, RuntimeError) as exc:
            raise FatalError(f"cannot serve gRPC on {self.settings.host}:{self.settings.grpc_port}: {exc}") from None
        if self.settings.metrics_port >= 0:
            try:
                self.metrics.serve(self.settings.host, self.settings.metrics_port)
            except OSError as exc:
                raise FatalError(f"cannot serve metrics on port {self.settings.metrics_port}: {exc}") from None
        self.log.info("starting %s (gRPC %s:%d)", self.id, self.settings.host, self.grpc.port)
        try:
            await self.bus.connect()
        except CredentialsError as exc:  # e.g. a password file that is not there: one line, exit 1
            raise FatalError(str(exc)) from None
        # Answered until the process is gone (not a served subject: draining keeps it), so a caller
        # waiting on this instance can tell a dead process (no responders) from a slow one.
        await self.bus.subscribe(subjects.alive(self.id), self._on_alive)
        await self.on_start()
        key = instance_key(self.settings.etcd_prefix, self.kind, self.id)
        self.registration = Registration(
            self.store, key, self.instance_info().SerializeToString(), self.settings.lease_ttl_s
        )
        self.registration.start()
        self.refresh_health()
        if self._health_task is not None:
            await self._health_task
        self.log.info("%s ready", self.id)

    def refresh_health(self) -> None:
        """Publish the instance's readiness (readiness_gap) to its gRPC health service, once started and until
        it stops; liveness stays SERVING meanwhile. Updates are applied in order by one task."""
        if self._stop_requested.is_set() or self.registration is None:
            return
        gap = self.readiness_gap()
        if gap != self._health_gap and (gap or self._health_gap is not None):  # a change (or not ready at start)
            self.log.info("%s: gRPC health %s", self.id, f"NOT_SERVING ({gap})" if gap else "SERVING")
        self._health_gap = gap
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._publish_health())

    async def _health_settled(self) -> None:
        task = self._health_task
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def _publish_health(self) -> None:
        while self._health_gap is not None and self._health_published != (wanted := not self._health_gap):
            if self._stop_requested.is_set():
                return
            await self.grpc.set_serving(wanted, live=True)
            self._health_published = wanted

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def stop(self) -> None:
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._stop_requested.set()
        timeout = self.settings.drain_timeout_s
        self.log.info("stopping %s (drain up to %.0fs)", self.id, timeout)
        await self._quietly(self._health_settled(), "health")  # an update in progress must not undo this one
        await self._quietly(self.grpc.set_serving(False), "health")
        if self.registration is not None:
            await self._quietly(self.registration.leave(), "leave etcd")
            await asyncio.sleep(LEAVE_GRACE_S)
        await self._quietly(self.bus.stop_serving(), "unsubscribe")
        started = time.monotonic()
        await self._quietly(self.on_drain(timeout), "drain")
        left = max(0.1, timeout - (time.monotonic() - started))
        if not await self.bus.wait_idle(left):
            self.log.warning("drain timeout: cancelled unfinished requests")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._quietly(self.on_close(), "close")
        await self._quietly(self.bus.close(), "close NATS")
        await self._quietly(self.grpc.stop(1.0), "stop gRPC")
        await self._quietly(self.store.close(), "close etcd")
        self.metrics.close()
        self.log.info("%s stopped", self.id)

    def log_tasks(self) -> None:
        """SIGUSR1: log where every task of the event loop waits and the NATS connection's state (for a
        process that seems stuck: `kill -USR1 <pid>`)."""
        nc = self.bus.nc
        state = "none" if nc is None else (
            f"connected={nc.is_connected} reconnecting={nc.is_reconnecting} pending_bytes={nc.pending_data_size} "
            f"subscriptions={len(nc._subs)}"  # nats-py exposes no count of its subscriptions
        )
        lines = [f"{len(asyncio.all_tasks())} tasks; NATS {state}; in flight {self.bus.inflight}"]
        for task in asyncio.all_tasks():
            frames = task.get_stack(limit=8)
            where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames)) or "(not started)"
            lines.append(f"  {task.get_name()}: {where}")
        self.log.warning("task dump (SIGUSR1):\n%s", "\n".join(lines))

    async def _quietly(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await coro
        except Exception as exc:
            self.log.warning("%s failed during stop: %s", what, exc)

    async def run(self) -> None:
        """Start, serve until a stop signal, then stop. Raises FatalError for fatal problems."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.log_tasks)
        start = asyncio.create_task(self.start())
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            # Python 3.11's wait_for can swallow a cancel that races with the awaited future finishing
            # (nats-py's connect retry loop then goes on), so cancel until the start task has really ended.
            while not start.done():
                start.cancel()
                await asyncio.wait({start}, timeout=0.5)
            await asyncio.gather(start, return_exceptions=True)
            failure = None if start.cancelled() else start.exception()
            if failure is not None:
                raise failure
            await stop_wait
        finally:
            stop_wait.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        if self._fatal is not None:
            raise FatalError(str(self._fatal) or type(self._fatal).__name__)

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def run_service(service_cls: type[Service], settings_cls: type[CommonSettings], argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m unimodel.<service>` and `unimodel <service>`."""
    prog = f"unimodel {settings_cls.service}"
    try:
        settings = load_settings(settings_cls, argv, prog=prog)
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings_cls.service, settings.instance_id, settings.log_level, settings.log_format)
    provider = setup_tracing(
        settings_cls.service, settings.instance_id, settings.otel_exporter, settings.otel_endpoint,
        settings.otel_sample_ratio,
    )
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        runner = asyncio.run
    async def main() -> None:
        # Built inside the running loop: gRPC aio servers bind to the loop that creates them.
        await service_cls(settings).run()

    try:
        runner(main())
    except FatalError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if provider is not None:
            provider.shutdown()  # export the spans still buffered
    return 0
