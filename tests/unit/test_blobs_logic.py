"""core/blobs.py without a network: ranges, range requests, parts, answer headers."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from unimodel.core import blobs, errors, payload_limits, subjects
from unimodel.core.blobs import _Held
from unimodel.v1 import inference_pb2
from unimodel.worker.service import predict_response

CHUNK = payload_limits.BLOB_CHUNK_BYTES


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, []), (1, [(0, 1)]), (CHUNK, [(0, CHUNK)]), (CHUNK + 1, [(0, CHUNK), (CHUNK, 1)]),
        (3 * CHUNK, [(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, CHUNK)]),
    ],
)
def test_ranges_cover_the_payload_in_chunks(size: int, expected: list[tuple[int, int]]) -> None:
    assert blobs.ranges(size) == expected


def test_a_range_request_is_twelve_bytes() -> None:
    assert blobs.parse_range(blobs._RANGE.pack(5, 7)) == (5, 7)
    with pytest.raises(errors.InvalidArgument, match="12 bytes"):
        blobs.parse_range(b"\x00" * 11)


def test_a_payload_held_in_parts_reads_as_their_concatenation() -> None:
    parts = [b"abc", b"", b"defgh", b"ij"]
    held = _Held([memoryview(p) for p in parts], 10, once=False)
    whole = b"".join(parts)
    for offset in range(11):
        for length in range(12):
            assert bytes(held.read(offset, length)) == whole[offset : offset + length], (offset, length)
    single = held.read(3, 5)
    assert isinstance(single, memoryview)  # within one part: a view, no copy


def test_answer_headers_round_trip_and_a_malformed_one_is_refused() -> None:
    ref = inference_pb2.BlobRef(subject=f"{subjects.blobs('w-1')}.{'ab' * 16}", size=123)
    headers = blobs.answer_headers(ref)
    assert blobs.answer_ref(headers[subjects.Header.BLOB]) == ref
    ref.local = "/proc/123/fd/45"  # the owner's memory file, for a reader on the same host
    assert blobs.answer_ref(blobs.answer_headers(ref)[subjects.Header.BLOB]) == ref
    for bad in ("", "subject-only", "subject x12", " 12"):
        with pytest.raises(errors.Internal, match="malformed"):
            blobs.answer_ref(bad)


def test_blob_subjects_are_in_the_owner_s_tree_and_in_the_permissions() -> None:
    assert subjects.blobs("gw-1") == "unimodel.v1.blob.gw-1"
    gateway, worker = subjects.permissions("gateway", "gw-1"), subjects.permissions("gpu-worker", "w-1")
    assert "unimodel.v1.blob.gw-1.*" in gateway.subscribe and subjects.BLOBS_ALL in gateway.publish
    assert "unimodel.v1.blob.w-1.*" in worker.subscribe and subjects.BLOBS_ALL in worker.publish
    assert subjects.BLOBS_ALL not in subjects.permissions("batcher", "b-1").publish  # the batcher never reads payloads


@pytest.mark.parametrize("text", ["", "ping", "x" * (payload_limits.BLOB_BYTES + 1)])
def test_a_predict_answer_in_parts_decodes_as_the_message(text: str) -> None:
    output = struct_pb2.Value(string_value=text)
    parts = predict_response("echo", output, "w-1", ["gw", "w-1"])
    expected = inference_pb2.PredictResponse(model="echo", output=output, worker_id="w-1", path=["gw", "w-1"])
    assert inference_pb2.PredictResponse.FromString(b"".join(parts)) == expected
    assert parts[-1] == output.SerializeToString()  # the output is its own part: held as it is, never joined
