"""Gather what `unimodel status` shows: instances and models from etcd, each instance's gRPC health, the
router's view of the workers (RouterService.ListInstances) and every batcher's queues
(BatcherService.ListQueues). Calls to the services run at once, each with its own timeout; an instance
that does not answer is reported, not waited for."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from unimodel.core.membership import instances_prefix, models_prefix
from unimodel.core.store import KeyValueStore
from unimodel.status.view import UNREACHABLE, ClusterView, build
from unimodel.v1 import model_pb2, registry_pb2, services_pb2, services_pb2_grpc

M = TypeVar("M", bound=Message)


async def read_registry(
    store: KeyValueStore, prefix: str
) -> tuple[list[registry_pb2.InstanceInfo], list[model_pb2.ModelConfig]]:
    """Every registered instance and model under `prefix` (raises StoreError when etcd cannot be read);
    values that do not decode are skipped."""
    raw_instances, _ = await store.get_prefix(instances_prefix(prefix).encode())
    raw_models, _ = await store.get_prefix(models_prefix(prefix).encode())
    return _decode(raw_instances, registry_pb2.InstanceInfo), _decode(raw_models, model_pb2.ModelConfig)


def _decode(raw: dict[bytes, bytes], message: type[M]) -> list[M]:
    out: list[M] = []
    for value in raw.values():
        try:
            out.append(message.FromString(value))
        except DecodeError:
            continue
    return out


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{UNREACHABLE}: {exc.code().name}"
    if isinstance(exc, TimeoutError):
        return f"{UNREACHABLE}: no answer"
    return f"{UNREACHABLE}: {type(exc).__name__}"


class _Calls:
    """One gRPC channel per instance address, closed together."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    async def health(self, info: registry_pb2.InstanceInfo) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel(info.grpc_address)).Check(
                health_pb2.HealthCheckRequest(), timeout=self.timeout_s
            )
        except Exception as exc:
            return _why(exc)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def outstanding(self, routers: list[registry_pb2.InstanceInfo]) -> dict[str, int] | None:
        """Batches each worker has outstanding, as the first router that answers sees it."""
        for router in routers:
            try:
                reply = await services_pb2_grpc.RouterServiceStub(self.channel(router.grpc_address)).ListInstances(
                    services_pb2.ListInstancesRequest(), timeout=self.timeout_s
                )
            except Exception:
                continue
            return {state.info.id: state.outstanding for state in reply.instances}
        return None

    async def queues(self, batcher: registry_pb2.InstanceInfo) -> services_pb2.ListQueuesResponse | str:
        try:
            return await services_pb2_grpc.BatcherServiceStub(self.channel(batcher.grpc_address)).ListQueues(
                services_pb2.ListQueuesRequest(), timeout=self.timeout_s
            )
        except Exception as exc:
            return _why(exc)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)


async def collect(store: KeyValueStore, prefix: str, etcd: str, timeout_s: float = 2.0) -> ClusterView:
    instances, models = await read_registry(store, prefix)
    calls = _Calls(timeout_s)
    try:
        batchers = [i for i in instances if i.kind == "batcher"]
        routers = [i for i in instances if i.kind == "router"]
        healths, outstanding, queues = await asyncio.gather(
            asyncio.gather(*(calls.health(i) for i in instances)),
            calls.outstanding(routers),
            asyncio.gather(*(calls.queues(b) for b in batchers)),
        )
    finally:
        await calls.close()
    health = {info.id: h for info, h in zip(instances, healths, strict=True)}
    return build(
        etcd, instances, models, health, outstanding, {b.id: q for b, q in zip(batchers, queues, strict=True)}
    )
