"""Plain batch execution: skip expired items, run the engine once, one outcome per item. No transport."""

from __future__ import annotations

from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.v1 import inference_pb2
from unimodel.worker.engines import Engine

Outcome = struct_pb2.Value | errors.UnimodelError


async def run_batch(engine: Engine, batch: inference_pb2.BatchRequest) -> list[Outcome]:
    """Outputs (or errors) in item order. Expired items are answered DEADLINE_EXCEEDED, never run;
    a failed engine call fails every live item with its cause."""
    now = now_ms()
    outcomes: list[Outcome] = [
        errors.DeadlineExceeded("deadline passed before execution") for _ in batch.items
    ]
    live = [i for i, item in enumerate(batch.items) if not item.deadline_unix_ms or item.deadline_unix_ms > now]
    if not live:
        return outcomes
    try:
        outputs = await engine.infer([batch.items[i].input for i in live])
        if len(outputs) != len(live):
            raise errors.Internal(f"engine returned {len(outputs)} outputs for {len(live)} inputs")
    except errors.UnimodelError as exc:
        for i in live:
            outcomes[i] = exc
    else:
        for i, out in zip(live, outputs, strict=True):
            outcomes[i] = out
    return outcomes
