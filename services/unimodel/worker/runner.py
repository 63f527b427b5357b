"""Plain batch execution: one outcome per item, in order. No transport.

Expired items are answered DEADLINE_EXCEEDED and never run. Tensor items (KServe) are checked against
the config, predict-API values go through the model's processor; a bad item fails alone. The rest is
concatenated along the batch dimension (tensor_batches.py), run once per shape group (in chunks of at most
max_batch_size rows), and split back per item. A failed engine call fails each of its live items with
the cause.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.v1 import inference_pb2
from unimodel.worker import tensor_batches
from unimodel.worker.models import LoadedModel
from unimodel.worker.tensor_batches import Prepared

log = logging.getLogger("unimodel.gpu-worker.runner")

Outcome: TypeAlias = dict[str, np.ndarray] | struct_pb2.Value | errors.UnimodelError
"""Tensor item: its output arrays by name (its rows, the outputs it asked for); value item: its output
value; or the item's error."""

OFFLOAD_ITEMS = 16
"""Value batches of at least this many items are pre/post-processed in the executor even when the
processor is light (a few hundred numbers per item add up)."""

T = TypeVar("T")


async def run_batch(
    model: LoadedModel, batch: inference_pb2.BatchRequest, executor: concurrent.futures.Executor | None = None
) -> list[Outcome]:
    items = batch.items
    now = now_ms()
    outcomes: list[Any] = [None] * len(items)
    tensor_items: list[int] = []
    value_items: list[int] = []
    for i, item in enumerate(items):
        deadline = item.deadline_unix_ms
        if deadline and deadline <= now:
            outcomes[i] = errors.DeadlineExceeded("deadline passed before execution")
        elif item.HasField("generate"):
            outcomes[i] = errors.InvalidArgument(
                f"model {model.name!r} does not generate text (engine {model.engine.kind})", model=model.name, field="model"
            )
        elif item.inputs:
            tensor_items.append(i)
        else:
            value_items.append(i)
    jobs = []
    if tensor_items:
        jobs.append(_tensor_items(model, items, tensor_items, outcomes))
    if value_items:
        jobs.append(_value_items(model, items, value_items, outcomes, executor))
    if len(jobs) == 1:
        await jobs[0]
    elif jobs:
        await asyncio.gather(*jobs)
    return outcomes


async def _tensor_items(model: LoadedModel, items: Sequence[inference_pb2.BatchItem], which: list[int], outcomes: list[Any]) -> None:
    layout = model.layout
    groups = None
    if layout.direct is not None:
        prepared, bad, groups = tensor_batches.assemble_direct(layout, items, which)
        for i, exc in bad:
            outcomes[i] = exc
    else:
        prepared = []
        for i in which:
            try:
                p = tensor_batches.prepare_tensor_item(layout, items[i])
            except errors.UnimodelError as exc:
                outcomes[i] = exc
                continue
            p.index = i
            prepared.append(p)
    results = await execute(model, prepared, groups)
    for p, result in zip(prepared, results, strict=True):
        outcomes[p.index] = result


async def _value_items(
    model: LoadedModel,
    items: Sequence[inference_pb2.BatchItem],
    which: list[int],
    outcomes: list[Any],
    executor: concurrent.futures.Executor | None,
) -> None:
    values = [items[i].input for i in which]
    engine = model.engine
    if engine.takes_values:
        try:
            outputs = await engine.infer_values(values, [items[i].tenant for i in which])
            if len(outputs) != len(values):
                raise errors.Internal(f"engine returned {len(outputs)} outputs for {len(values)} inputs")
        except Exception as exc:
            err = _as_error(exc, model)
            for i in which:
                outcomes[i] = err
            return
        for i, out in zip(which, outputs, strict=True):
            outcomes[i] = out
        return

    processor = model.processor
    if processor is None:
        err = errors.Internal(f"model {model.name!r} has no processor for predict values")
        for i in which:
            outcomes[i] = err
        return
    offload = processor.heavy or len(values) >= OFFLOAD_ITEMS
    try:
        ready = await _call(offload, executor, processor.prepare, values)
    except Exception as exc:
        err = _as_error(exc, model)
        for i in which:
            outcomes[i] = err
        return
    prepared: list[Prepared] = []
    for i, p in zip(which, ready, strict=True):
        if isinstance(p, errors.UnimodelError):
            outcomes[i] = p
        else:
            p.index = i
            prepared.append(p)
    results = await execute(model, prepared)

    def finish_all() -> list[Any]:
        out: list[Any] = []
        for p, result in zip(prepared, results, strict=True):
            if isinstance(result, errors.UnimodelError):
                out.append(result)
                continue
            try:
                out.append(processor.finish(p, result))
            except Exception as exc:
                out.append(_as_error(exc, model))
        return out

    for p, outcome in zip(prepared, await _call(offload, executor, finish_all), strict=True):
        outcomes[p.index] = outcome


async def execute(
    model: LoadedModel, prepared: Sequence[Prepared], groups: Sequence[tensor_batches.Group] | None = None
) -> list[dict[str, np.ndarray] | errors.UnimodelError]:
    """Run prepared items on the engine: one call per shape group (groups run concurrently, so several
    engine instances share the work); each item's output rows, or the group's error. `groups`: the
    groups with their inputs already concatenated (else formed here from each item's arrays)."""
    layout = model.layout
    results: list[Any] = [None] * len(prepared)

    async def run_group(positions: list[int], joined: dict[str, np.ndarray] | None) -> None:
        members = [prepared[i] for i in positions]
        try:
            inputs = joined if joined is not None else tensor_batches.concat(layout, members)
            outputs = await _infer(model, members, inputs)
            per_item: list[Any] = tensor_batches.split(layout, outputs, members)
        except Exception as exc:
            per_item = [_as_error(exc, model)] * len(members)
        for i, r in zip(positions, per_item, strict=True):
            results[i] = r

    if not prepared:
        return []
    runs: Sequence[tuple[list[int], dict[str, np.ndarray] | None]] = (
        groups if groups is not None else [(g, None) for g in tensor_batches.groups(layout, prepared)]
    )
    if len(runs) == 1:
        await run_group(*runs[0])
    else:
        await asyncio.gather(*(run_group(*g) for g in runs))
    return results


async def _infer(model: LoadedModel, members: list[Prepared], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    layout, engine = model.layout, model.engine
    names = tensor_batches.union_outputs(layout, members)
    if not layout.batches:
        return await engine.infer(inputs, names)
    rows = sum(p.rows for p in members)
    limit = layout.rows_limit
    if rows <= limit:
        out = await engine.infer(inputs, names)
        tensor_batches.check_rows(layout, out, rows)
        return out
    chunks = tensor_batches.row_chunks(rows, limit)
    parts = await asyncio.gather(*(engine.infer({n: a[s:e] for n, a in inputs.items()}, names) for s, e in chunks))
    for part, (s, e) in zip(parts, chunks, strict=True):
        tensor_batches.check_rows(layout, part, e - s)
    return {n: np.concatenate([part[n] for part in parts]) for n in names}


async def _call(offload: bool, executor: concurrent.futures.Executor | None, fn: Callable[..., T], *args: Any) -> T:
    if not offload:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _as_error(exc: BaseException, model: LoadedModel) -> errors.UnimodelError:
    if isinstance(exc, errors.UnimodelError):
        return exc
    log.error("model %s: %s engine or processing failed", model.name, model.engine.kind, exc_info=exc)
    return errors.Internal(f"model {model.name!r}: the {model.engine.kind} engine failed")
