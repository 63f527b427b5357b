"""The engine interface: :class:`Engine` (what the worker's runtime sees of every engine) and
:func:`engine_option` (an engine's typed ``options.<key>``).

An engine runs one model (one :class:`ModelConfig`) on a whole, already concatenated batch:
``infer({input name: array with the batch dimension}, [output names]) -> {output name: array}``.
Checking, concatenating and splitting requests is the runner's job (worker/tensor_batches.py),
pre/post-processing the processors' (worker/processors/).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.v1 import model_pb2

_KIND_NAMES = {int: "an integer", float: "a number"}


def engine_option(
    config: model_pb2.ModelConfig,
    key: str,
    kind: type,
    default: Any,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> Any:
    """``options.<key>`` of the model as ``kind`` (int, float, str, or bool written "0"/"1"/"true"/"false"),
    ``default`` when unset or empty; a value that does not parse or is out of range is an InvalidArgument
    naming the option. ``minimum``: the value must be >= it; ``positive``: > 0."""
    raw = config.options.get(key, "")
    if not raw:
        return default
    where = f"model {config.name!r}: options.{key}"
    if kind is bool:
        if raw not in ("0", "1", "true", "false"):
            raise errors.InvalidArgument(f"{where} must be 0 or 1")
        return raw in ("1", "true")
    if kind is str:
        return raw
    try:
        value = kind(raw)
    except ValueError:
        raise errors.InvalidArgument(f"{where} {raw!r} is not {_KIND_NAMES.get(kind, kind.__name__)}") from None
    if minimum is not None and value < minimum:
        raise errors.InvalidArgument(f"{where} must be >= {minimum}")
    if positive and value <= 0:
        raise errors.InvalidArgument(f"{where} must be > 0")
    return value


class Engine(abc.ABC):
    """Runs one model. ``load`` before the first ``infer``; ``unload`` frees its resources."""

    kind: ClassVar[str] = "engine"
    # True: predict-API values go to `infer_values` as they are, with no pre/post-processing.
    takes_values: ClassVar[bool] = False
    # True: a text-generation engine (generative.GenerativeEngine): batches of GenerateRequests, streamed answers.
    generative: ClassVar[bool] = False

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        self.config = config
        self.model = config.name

    @property
    def concurrency(self) -> int:
        """Batches the engine runs at once; 0 = no limit of its own (the worker's slots apply)."""
        return 0

    async def load(self) -> None:  # noqa: B027  (optional hook: an engine with nothing to load keeps it)
        """Load weights / create sessions (off the event loop when it blocks)."""

    async def unload(self) -> None:  # noqa: B027  (optional hook: an engine with nothing to free keeps it)
        """Release the model's resources. Called once no batch runs on the engine any more."""

    @abc.abstractmethod
    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch: every input carries the batch dimension (when the model batches); return
        the requested outputs with the same number of rows."""

    async def infer_values(self, values: Sequence[struct_pb2.Value], tenants: Sequence[str] = ()) -> list[Any]:
        """Predict-API values in, one output value (or the item's UnimodelError) per input (engines with
        ``takes_values``). ``tenants``: each item's tenant (BatchItem.tenant), for engines that let items of
        one batch influence each other's results and must keep tenants apart."""
        raise errors.Internal(f"the {self.kind} engine does not take values")
