"""The built-in engines, which need no package and no model file: ``echo`` (the built-in test model; it
also takes predict-API values as they are) and ``delay`` (waits, then echoes: a load-test engine that
uses no CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.v1 import model_pb2
from unimodel.worker.engines.engine import Engine, engine_option


def _first_to_first(config: model_pb2.ModelConfig, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Input i returned as output i (echo-style engines)."""
    # not strict: inputs and outputs may differ in number; an output with no input i fails below when asked for
    pairs = {o.name: i.name for i, o in zip(config.inputs, config.outputs, strict=False)}
    out: dict[str, np.ndarray] = {}
    for name in outputs:
        source = pairs.get(name)
        if source is None:
            raise errors.InvalidArgument(f"model {config.name!r}: output {name!r} has no matching input to echo")
        out[name] = inputs[source]
    return out


class EchoEngine(Engine):
    """Returns its inputs: the built-in test model that exercises the whole path."""

    kind = "echo"
    takes_values = True

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return _first_to_first(self.config, inputs, outputs)

    async def infer_values(self, values: Sequence[struct_pb2.Value], tenants: Sequence[str] = ()) -> list[struct_pb2.Value]:
        return list(values)


class DelayEngine(Engine):
    """Waits ``options.delay_ms`` per batch (asyncio sleep: no CPU, no thread), then returns INPUT0 as
    OUTPUT0 (input i as output i). Stands in for an accelerator-bound model in load tests."""

    kind = "delay"

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.delay_s = engine_option(config, "delay_ms", float, 0.0) / 1000.0
        if not 0 <= self.delay_s <= 3600:
            raise errors.InvalidArgument(f"model {config.name!r}: options.delay_ms must be within 0..3600000")

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return _first_to_first(self.config, inputs, outputs)
