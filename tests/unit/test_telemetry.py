from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from unimodel.core.telemetry import request_id_var, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_service_instance_and_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("router", "router-1", "info", "json")
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("unimodel.router").info("picked %s", "w1")
    finally:
        request_id_var.reset(token)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["service"] == "router" and line["instance"] == "router-1"
    assert line["msg"] == "picked w1" and line["request_id"] == "req-7" and line["level"] == "info"


def test_text_logs_are_one_line_with_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("batcher", "batcher-1", "debug", "text")
    token = request_id_var.set("abc")
    try:
        logging.getLogger("unimodel.batcher").warning("queue full")
    finally:
        request_id_var.reset(token)
    out = capsys.readouterr().err.strip()
    assert out.endswith("WARNING unimodel.batcher: queue full request_id=abc")
    assert "\n" not in out
