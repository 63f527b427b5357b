"""The engine table (worker/engines/__init__.py): one entry per kind drives availability and construction."""

from __future__ import annotations

import importlib.util
import pkgutil

import pytest

from unimodel.core import errors, modelconfig
from unimodel.worker.engines import ENGINES, Engine, available_engines, create_engine
from unimodel.worker.models import builtin_config


@pytest.mark.parametrize("kind", list(ENGINES))
def test_every_entry_names_the_engine_class_of_its_kind(kind: str) -> None:
    engine_class = pkgutil.resolve_name(ENGINES[kind][1])  # imports the engine's module, not its package
    assert issubclass(engine_class, Engine) and engine_class.kind == kind


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed in this venv")
def test_a_kind_whose_package_is_missing_is_not_announced_and_not_built() -> None:
    assert "vllm" not in available_engines()
    config = modelconfig.parse({"name": "chat", "engine": "vllm", "path": "/models/chat"})
    with pytest.raises(errors.FailedPrecondition, match=r"^the vllm engine is not available here \(vllm is not installed\)$"):
        create_engine(config)


def test_an_unknown_kind_is_refused_with_the_kinds_there_are() -> None:
    config = builtin_config("echo")
    config.engine = "tpu"  # modelconfig refuses it; a ModelConfig off the wire is not checked again
    with pytest.raises(errors.InvalidArgument, match=r"unknown engine 'tpu'; known: onnx, .*delay, echo$"):
        create_engine(config)
