from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_cross_process_message_is_in_protos() -> None:
    from unimodel.v1 import errors_pb2, inference_pb2, registry_pb2, services_pb2

    names = {
        *inference_pb2.DESCRIPTOR.message_types_by_name,
        *registry_pb2.DESCRIPTOR.message_types_by_name,
        *errors_pb2.DESCRIPTOR.message_types_by_name,
        *services_pb2.DESCRIPTOR.message_types_by_name,
    }
    needed_messages = (
        "PredictRequest", "PredictResponse", "BatchRequest", "BatchAck", "InstanceInfo", "ErrorDetail", "ListQueuesResponse", "QueueState",
    )
    for needed in needed_messages:
        assert needed in names
    assert set(services_pb2.DESCRIPTOR.services_by_name) == {"InferenceService", "RouterService", "BatcherService"}


def test_encoded_mirrors_have_their_messages_fields() -> None:
    """EncodedItemBundle / EncodedBatchRequest are wire-compatible with ItemBundle / BatchRequest: the same
    fields (number, name, type, repetition), except that BatchItem fields are `bytes` (both length-delimited)."""
    from google.protobuf.descriptor import FieldDescriptor

    from unimodel.v1 import inference_pb2

    def fields(message: Any) -> dict[int, tuple[str, int, bool]]:
        out = {}
        for f in message.DESCRIPTOR.fields:
            kind = FieldDescriptor.TYPE_BYTES if f.type == FieldDescriptor.TYPE_MESSAGE else f.type
            out[f.number] = (f.name, kind, f.is_repeated)
        return out

    for real, mirror in ((inference_pb2.ItemBundle, inference_pb2.EncodedItemBundle),
                         (inference_pb2.BatchRequest, inference_pb2.EncodedBatchRequest)):
        assert fields(real) == fields(mirror)
        assert all(f.message_type is None for f in mirror.DESCRIPTOR.fields)
        assert [f.message_type.name for f in real.DESCRIPTOR.fields if f.message_type] == ["BatchItem"]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**63 - 1])
def test_varint_matches_protobuf(n: int) -> None:
    from unimodel.core.protowire import varint
    from unimodel.v1 import inference_pb2

    assert inference_pb2.BatchItem.FromString(b"\x18" + varint(n)).deadline_unix_ms == n
    if n:  # proto3 leaves a zero out
        assert b"\x18" + varint(n) == inference_pb2.BatchItem(deadline_unix_ms=n).SerializeToString()
