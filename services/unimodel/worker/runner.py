"""Plain batch execution: skip expired items, run the engine once, map results back. No transport here."""

from __future__ import annotations

from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.v1 import inference_pb2
from unimodel.worker.engines import Engine


async def run_batch(engine: Engine, batch: inference_pb2.BatchRequest, worker_id: str) -> inference_pb2.BatchResponse:
    """Execute the items whose deadline has not passed; expired items are answered, never run."""
    now = now_ms()
    results = [inference_pb2.ItemResult(request_id=item.request_id) for item in batch.items]
    live = [i for i, item in enumerate(batch.items) if not item.deadline_unix_ms or item.deadline_unix_ms > now]
    for i in set(range(len(batch.items))) - set(live):
        results[i].error.CopyFrom(errors.DeadlineExceeded("deadline passed before execution").to_proto())
    if live:
        try:
            outputs = await engine.infer([batch.items[i].input for i in live])
            if len(outputs) != len(live):
                raise errors.Internal(f"engine returned {len(outputs)} outputs for {len(live)} inputs")
        except errors.UnimodelError as exc:
            for i in live:
                results[i].error.CopyFrom(exc.to_proto())
        else:
            for i, out in zip(live, outputs):
                results[i].output.CopyFrom(out)
    return inference_pb2.BatchResponse(
        batch_id=batch.batch_id, worker_id=worker_id, results=results, path=[*batch.path, worker_id]
    )
