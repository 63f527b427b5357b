from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    for needed in ("PredictRequest", "PredictResponse", "BatchRequest", "BatchAck", "InstanceInfo", "ErrorDetail", "ListQueuesResponse", "QueueState"):
        assert needed in names
    assert set(services_pb2.DESCRIPTOR.services_by_name) == {"InferenceService", "RouterService", "BatcherService"}
