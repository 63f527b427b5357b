"""Engines behind one interface. The worker's runtime only sees :class:`Engine`.

Later engines (ONNX Runtime, llama.cpp, vLLM, upstream OpenAI) implement the same protocol.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from google.protobuf import struct_pb2

from unimodel.core.errors import InvalidArgument


class Engine(abc.ABC):
    """Runs one model. `infer` gets a whole batch and returns one output per input, in order."""

    kind: str = "engine"

    def __init__(self, model: str) -> None:
        self.model = model

    async def load(self) -> None:
        """Load weights / sessions. Called once before the model is announced."""

    async def unload(self) -> None:
        """Release the model's resources."""

    @abc.abstractmethod
    async def infer(self, inputs: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]: ...


class EchoEngine(Engine):
    """Returns its inputs: the built-in test model that exercises the whole path."""

    kind = "echo"

    async def infer(self, inputs: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]:
        return list(inputs)


BUILTIN_ENGINES: dict[str, type[Engine]] = {"echo": EchoEngine}


def builtin_engine(name: str) -> Engine:
    try:
        return BUILTIN_ENGINES[name](name)
    except KeyError:
        raise InvalidArgument(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_ENGINES))}") from None
