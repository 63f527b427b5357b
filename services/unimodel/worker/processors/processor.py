"""The base of the processors: a model's JSON values to engine arrays (`prepare`) and back (`finish`),
with the helpers every kind uses (input errors, assets, options)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2
from unimodel.worker.tensor_batches import Layout, Prepared


class Processor(abc.ABC):
    kind: ClassVar[str] = "none"
    # Prepare / finish off the event loop even for small batches (image decode, tokenization).
    heavy: ClassVar[bool] = False

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        self.config = config
        self.layout = layout
        self.model = config.name
        self.options = dict(config.processing.options)
        self.outputs: tuple[str, ...] = layout.output_names  # what the engine is asked for

    def prepare(self, values: Sequence[struct_pb2.Value]) -> list[Prepared | errors.UnimodelError]:
        out: list[Prepared | errors.UnimodelError] = []
        for value in values:
            try:
                out.append(self.prepare_one(value))
            except errors.UnimodelError as exc:
                out.append(exc)
        return out

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        raise NotImplementedError

    @abc.abstractmethod
    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        """The item's answer from its output rows."""

    # helpers
    def bad(self, message: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"model {self.model!r}: {message}", model=self.model, field="input")

    def setup_error(self, message: str) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(f"model {self.model!r} ({self.kind} processing): {message}")

    def asset(self, key: str, default: str, *, required: bool) -> Path | None:
        """The file options.<key> (or `default`) of the model folder; it must stay inside the folder
        (modelconfig.model_file: PermissionDenied otherwise, whatever wrote the config)."""
        name = self.options.get(key, "")
        path = modelconfig.model_file(self.config, name or default, f"processing.options.{key}")
        if path.is_file():
            return path
        if required or name:
            raise self.setup_error(f"{name or default} does not exist in the model folder (options.{key})")
        return None

    def option_int(self, key: str, default: int) -> int:
        raw = self.options.get(key, "")
        try:
            return int(raw) if raw else default
        except ValueError:
            raise self.setup_error(f"options.{key} {raw!r} is not an integer") from None

    def labels(self) -> list[str]:
        path = self.asset("labels", "labels.txt", required=False)
        if path is None:
            return []
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
