"""Big payloads (issue 16), the plain logic: the bus's message limit and the 413 that names it, how items that
travel together are cut to fit, the nats-server limits UniModel configures, and the helper-process codec of
big :predict bodies (run in real processes here)."""

from __future__ import annotations

import asyncio
import struct
import subprocess

import orjson
import pytest

from unimodel.core import errors, nats_config, payload_limits
from unimodel.core.bus import header_bytes
from unimodel.core.values import from_value
from unimodel.gateway import big_bodies
from unimodel.gateway.unified.http import parse_body
from unimodel.local import binaries
from unimodel.v1 import inference_pb2

MIB = 1024 * 1024


def test_the_message_limit_keeps_room_for_the_envelope() -> None:
    assert payload_limits.message_limit(64 * MIB) == 64 * MIB - payload_limits.ENVELOPE_ROOM
    assert payload_limits.message_limit(MIB) == MIB - 64 * 1024
    assert payload_limits.message_limit(100_000) == 50_000  # a tiny server: half of it, never nothing


def test_too_large_is_a_413_naming_the_limit_in_bytes_and_mib() -> None:
    err = payload_limits.too_large(70_000_000, 64 * MIB)
    limit = 64 * MIB - 64 * 1024
    assert isinstance(err, errors.PayloadTooLarge) and err.http_status == 413
    assert f"{limit} bytes" in err.message and "63.9 MiB" in err.message and "70000000" in err.message
    assert err.metadata == {"limit": str(limit), "size": "70000000"}
    assert not err.retry_after_s  # sending it again would fail again


def test_check_refuses_only_what_is_over() -> None:
    limit = payload_limits.message_limit(MIB)
    payload_limits.check(limit, MIB)
    with pytest.raises(errors.PayloadTooLarge, match=str(limit)):
        payload_limits.check(limit + 1, MIB, "the answer")


def test_mib() -> None:
    assert payload_limits.mib(64 * MIB) == "64 MiB"
    assert payload_limits.mib(1_500_000) == "1.4 MiB"


@pytest.mark.parametrize(
    ("sizes", "limit", "runs"),
    [
        ([], 100, []),
        ([10, 10, 10], 100, [[0, 1, 2]]),  # all fit: one message, as before
        ([10, 90, 10], 100, [[0], [1], [2]]),  # the big one alone, the others not failed with it
        ([40, 40, 40], 120, [[0, 1], [2]]),  # each run with PER_ITEM per item stays within the limit
        ([500, 10], 100, [[0], [1]]),  # too big even alone: its own run, whoever sends it refuses it
    ],
)
def test_chunks(sizes: list[int], limit: int, runs: list[list[int]]) -> None:
    assert payload_limits.chunks(sizes, limit) == runs
    for run in payload_limits.chunks(sizes, limit):
        assert len(run) == 1 or sum(sizes[i] + payload_limits.PER_ITEM for i in run) <= limit


def test_big_items_travel_alone_even_when_they_would_fit_together() -> None:
    assert payload_limits.chunks([10, 500, 10, 10], 10_000, alone=400) == [[0], [1], [2, 3]]
    assert payload_limits.chunks([500], 10_000, alone=400) == [[0]]


def test_reply_batches_are_cut_to_fit_and_keep_every_answer_in_order() -> None:
    batch = inference_pb2.ReplyBatch()
    for i in range(5):
        batch.replies.add(reply_to=f"r.{i}", response=b"x" * 400)
    batch.replies.add(reply_to="r.err", error=errors.Unavailable("no").to_proto())
    assert payload_limits.reply_batches(batch, 10_000) == [batch.SerializeToString()]
    parts = payload_limits.reply_batches(batch, 1000)
    assert len(parts) > 1 and all(len(p) <= 1000 for p in parts)
    got = [r for p in parts for r in inference_pb2.ReplyBatch.FromString(p).replies]
    assert [r.reply_to for r in got] == [r.reply_to for r in batch.replies]
    assert got[-1].error.message == "no"


def test_header_bytes_is_what_nats_py_sends() -> None:
    assert header_bytes(None) == 0
    assert header_bytes({"a": "b"}) == len(b"NATS/1.0\r\na: b\r\n\r\n")


def test_the_nats_server_configuration_sets_the_documented_limits() -> None:
    text = nats_config.render_server_config({"gateway": "pw"})
    assert f"max_payload: {64 * MIB}" in text and f"max_pending: {nats_config.MAX_PENDING}" in text
    assert "max_payload: 1048576" in nats_config.render_server_config({}, max_payload=MIB)
    with pytest.raises(ValueError, match="64 MiB"):
        nats_config.limits_block(64 * MIB + 1)
    with pytest.raises(ValueError):
        nats_config.limits_block(0)


def test_nats_server_reads_the_rendered_configuration(tmp_path: object) -> None:
    from pathlib import Path

    config = Path(str(tmp_path)) / "nats.conf"
    config.write_text(nats_config.render_server_config({"gateway": "pw"}))
    done = subprocess.run([str(binaries.nats_server()), "-c", str(config), "-t"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_encode_predict_is_the_item_the_event_loop_would_send() -> None:
    raw = orjson.dumps({"input": {"text": "hi", "n": [1, 2.5]}, "parameters": {"k": "v"}})
    encoded = big_bodies.encode_predict(parse_body, raw)
    assert isinstance(encoded, bytes)
    item = inference_pb2.BatchItem.FromString(encoded)
    assert from_value(item.input) == {"text": "hi", "n": [1, 2.5]} and dict(item.parameters) == {"k": "v"}
    assert item.rows == 1 and not item.reply_to  # ReplyMux appends the request's own fields


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b"{not json", ""), (b'{"parameters": {}}', "input"), (b'{"input": 1, "extra": 2}', "extra")],
)
def test_encode_predict_answers_bad_bodies_with_the_event_loop_paths_errors(raw: bytes, field: str) -> None:
    failure = big_bodies.encode_predict(parse_body, raw)
    assert isinstance(failure, big_bodies.Failure)
    err = failure.error()
    assert isinstance(err, errors.InvalidArgument) and err.http_status == 400
    assert err.metadata.get("field", "") == field


def test_a_failure_crosses_back_as_the_same_error() -> None:
    err = big_bodies.Failure.of(errors.ResourceExhausted("busy", retry_after_s=2, queue="q")).error()
    assert isinstance(err, errors.ResourceExhausted) and err.retry_after_s == 2 and err.metadata == {"queue": "q"}


def test_decode_predict_reply_puts_the_gateway_first_in_the_path() -> None:
    reply = inference_pb2.PredictResponse(model="echo", worker_id="w1", path=["b1", "r1", "w1"])
    reply.output.string_value = "out"
    decoded = big_bodies.decode_predict_reply(reply.SerializeToString(), "g1")
    assert decoded == (orjson.dumps({"model": "echo", "output": "out"}), "w1", "g1,b1,r1,w1")
    broken = big_bodies.decode_predict_reply(b"\xff\xff", "g1")
    assert isinstance(broken, big_bodies.Failure) and broken.code == "INTERNAL"


def test_which_bodies_go_to_the_helper_processes() -> None:
    codec = big_bodies.BodyCodec(256 * 1024, 2)
    assert not codec.takes(256 * 1024 - 1) and codec.takes(256 * 1024)
    assert not big_bodies.BodyCodec(0, 2).takes(10**9)  # offload_body_bytes 0: never
    assert not big_bodies.BodyCodec(1024, 0).takes(10**9)  # no processes: never


def test_the_codec_runs_in_a_helper_process_and_raises_its_errors_here() -> None:
    async def main() -> tuple[bytes, errors.UnimodelError]:
        codec = big_bodies.BodyCodec(1, 1)
        try:
            encoded = await codec.run(big_bodies.encode_predict, parse_body, b'{"input": "' + b"a" * 300_000 + b'"}')
            with pytest.raises(errors.InvalidArgument) as caught:
                await codec.run(big_bodies.encode_predict, parse_body, b"[1, 2]")
            return encoded, caught.value
        finally:
            codec.close()

    encoded, err = asyncio.run(main())
    assert inference_pb2.BatchItem.FromString(encoded).input.string_value == "a" * 300_000
    assert "JSON object" in err.message


def test_kserve_bodies_and_answers_cross_to_a_helper_process_unchanged() -> None:
    """KServe v2 REST infer: the request parsed and the answer rendered in a helper give what the event loop
    would (InferCall and protobuf messages cross by pickle)."""
    import dataclasses

    from unimodel.gateway.kserve import codec as kserve

    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.5, -3.0]}]}
    body = orjson.dumps(doc)
    reply = inference_pb2.InferResponse(model="echo", worker_id="w")
    out = reply.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 3])
    out.contents = struct.pack("<3f", 1.0, 2.5, -3.0)

    async def main() -> tuple[object, object]:
        codec = big_bodies.BodyCodec(1, 1)
        try:
            call = await codec.run(kserve.parse_rest_infer, body, None)
            lean = dataclasses.replace(call, item=inference_pb2.BatchItem())
            rendered = await codec.run(kserve.render_rest_infer, reply, lean, "echo", "1")
            with pytest.raises(errors.InvalidArgument) as caught:  # its error, metadata and all
                await codec.run(kserve.parse_rest_infer, b'{"inputs": 3}', None)
            return (call, rendered), caught.value
        finally:
            codec.close()

    (call, rendered), err = asyncio.run(main())
    here = kserve.parse_rest_infer(body, None)
    assert call == here
    assert rendered == kserve.render_rest_infer(reply, here, "echo", "1")
    assert isinstance(err, errors.InvalidArgument) and err.http_status == 400
