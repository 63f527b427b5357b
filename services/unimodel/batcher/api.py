"""The batcher's gRPC API: its queues as it batches (BatcherService.ListQueues, read by `unimodel status`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from unimodel.core.grpc_server import maps_errors
from unimodel.v1 import services_pb2, services_pb2_grpc

if TYPE_CHECKING:
    from unimodel.batcher.service import BatcherService


def queue_states(batcher: BatcherService, model: str = "") -> services_pb2.ListQueuesResponse:
    """Every queue of the batcher (or `model`'s), by model name."""
    out = services_pb2.ListQueuesResponse(instance_id=batcher.id)
    for state in sorted(batcher.queues.values(), key=lambda s: s.model):
        if model and state.model != model:
            continue
        scheduler = state.scheduler
        policy = scheduler.queue.policy
        out.queues.add(
            model=state.model,
            queued=scheduler.queue.count,
            inflight_batches=scheduler.inflight,
            max_inflight_batches=scheduler.max_inflight,
            max_batch_size=policy.max_rows,
            max_queue_delay_ms=policy.max_queue_delay_s * 1000.0,
            max_queue_size=policy.max_queue_size,
            registered=state.model in batcher.policies,
        )
    return out


class BatcherApi(services_pb2_grpc.BatcherServiceServicer):
    def __init__(self, batcher: BatcherService) -> None:
        self.batcher = batcher

    @maps_errors
    async def ListQueues(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: services_pb2.ListQueuesRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.ListQueuesResponse:
        return queue_states(self.batcher, request.model)
