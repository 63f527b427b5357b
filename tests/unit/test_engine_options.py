"""engine_option: one parser for every engine's ModelConfig.options (onnx, delay, llamacpp, openai, vllm)."""

from __future__ import annotations

import pytest

from unimodel.core import errors
from unimodel.v1 import model_pb2
from unimodel.worker.engines import engine_option


def _config(**options: str) -> model_pb2.ModelConfig:
    return model_pb2.ModelConfig(name="m", options=options)


def test_values_parse_by_kind_and_unset_means_default() -> None:
    c = _config(n="4", x="0.5", on="1", off="false", s="bf16", empty="")
    assert engine_option(c, "n", int, 1) == 4
    assert engine_option(c, "x", float, 0.0) == 0.5
    assert engine_option(c, "on", bool, False) is True and engine_option(c, "off", bool, True) is False
    assert engine_option(c, "s", str, "auto") == "bf16"
    assert engine_option(c, "missing", int, 7) == 7 and engine_option(c, "empty", float, 2.5) == 2.5


@pytest.mark.parametrize(
    ("options", "call", "message"),
    [
        ({"n": "four"}, dict(key="n", kind=int, default=1), "model 'm': options.n 'four' is not an integer"),
        ({"x": "fast"}, dict(key="x", kind=float, default=1.0), "options.x 'fast' is not a number"),
        ({"b": "yes"}, dict(key="b", kind=bool, default=False), "options.b must be 0 or 1"),
        ({"n": "0"}, dict(key="n", kind=int, default=1, minimum=1), "options.n must be >= 1"),
        ({"t": "0"}, dict(key="t", kind=float, default=1.0, positive=True), "options.t must be > 0"),
    ],
)
def test_bad_values_name_the_option(options: dict[str, str], call: dict, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message.replace(".", r"\.")):
        engine_option(_config(**options), **call)
