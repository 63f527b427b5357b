"""KServe v2 / Open Inference Protocol with the official clients against the real cluster.

tritonclient.http and tritonclient.grpc (and Triton's perf_analyzer, unmodified, when
scripts/bench/setup_peers.sh installed it) call the gateway, whose requests cross batcher, router and a
gpu-worker running ONNX Runtime on the `identity` and `mlp` models of the test model repository. Results
are compared with ONNX Runtime run here on the same model file.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers.modelrepo import REPO_ROOT
from helpers.support import Infra, Services

MODELS = "identity,mlp"
PERF_ANALYZER = REPO_ROOT / ".venv-peers" / "bin" / "perf_analyzer"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Services]:
    """One cluster for the module: router, batcher, one gpu-worker, the gateway with identity and mlp."""
    infra = Infra(tmp_path_factory.mktemp("kserve"))
    # perf_analyzer saturates both cores: a longer lease than the default 3 s keeps a busy worker registered.
    services = Services(infra, lease_ttl_s=10)
    try:
        infra.start()
        services.start_cluster(workers=1, all_six=False, repository=model_repository, models=MODELS)
        yield services
    finally:
        services.stop()
        infra.stop()


@pytest.fixture(scope="module")
def mlp_reference(model_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_repository / "mlp" / "model.onnx"), providers=["CPUExecutionProvider"])


def _http(cluster: Services, concurrency: int = 1) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{cluster.http_port}", concurrency=concurrency, network_timeout=30)


def _grpc(cluster: Services) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{cluster.grpc_port}")


def _input(module: ModuleType, name: str, array: np.ndarray, datatype: str = "FP32", binary: bool = True) -> object:
    tensor = module.InferInput(name, list(array.shape), datatype)
    if module is httpclient:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def _mlp_expected(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return out


def test_tritonclient_http(cluster: Services, mlp_reference: ort.InferenceSession) -> None:
    client = _http(cluster)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert "statistics" in client.get_server_metadata()["extensions"]
        assert client.is_model_ready("mlp") and client.is_model_ready("identity") and not client.is_model_ready("nope")

        meta = client.get_model_metadata("mlp")
        assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 384]}]
        assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
        config = client.get_model_config("mlp")
        assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [384]
        assert config["input"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in config

        rng = np.random.default_rng(3)
        x = rng.standard_normal((3, 384), dtype=np.float32)
        result = client.infer("mlp", [_input(httpclient, "INPUT0", x)], request_id="mlp-1")
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), _mlp_expected(mlp_reference, x), rtol=1e-4, atol=1e-5)
        assert result.get_response()["id"] == "mlp-1" and result.get_response()["model_name"] == "mlp"

        y = rng.standard_normal((2, 5), dtype=np.float32)  # JSON in, JSON out
        result = client.infer(
            "identity", [_input(httpclient, "INPUT0", y, binary=False)],
            outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)],
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), y)
        assert "data" in result.get_response()["outputs"][0]

        for model, inputs, outputs, status, needle in (
            ("mlp", [_input(httpclient, "INPUT0", x[:, :100])], None, "400", "INPUT0"),
            ("mlp", [_input(httpclient, "INPUT0", x.astype(np.float64), "FP64")], None, "400", "FP64"),
            ("mlp", [_input(httpclient, "INPUT0", x)], [httpclient.InferRequestedOutput("NOPE")], "400", "NOPE"),
            ("nope", [_input(httpclient, "INPUT0", x)], None, "404", "nope"),
        ):
            with pytest.raises(InferenceServerException) as info:
                client.infer(model, inputs, outputs=outputs)
            assert info.value.status() == status and needle in info.value.message()

        (stats,) = client.get_inference_statistics("mlp")["model_stats"]
        assert stats["name"] == "mlp" and stats["version"] == "1"
        assert stats["inference_count"] >= 3 and stats["inference_stats"]["success"]["count"] >= 1
        assert stats["inference_stats"]["fail"]["count"] >= 1
    finally:
        client.close()


def test_tritonclient_grpc(cluster: Services, mlp_reference: ort.InferenceSession) -> None:
    client = _grpc(cluster)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
        meta = client.get_model_metadata("mlp")
        assert list(meta.inputs[0].shape) == [-1, 384] and meta.platform == "onnxruntime_onnx"
        assert client.get_model_config("mlp").config.max_batch_size == 64

        x = np.random.default_rng(4).standard_normal((5, 384), dtype=np.float32)
        result = client.infer("mlp", [_input(grpcclient, "INPUT0", x)], request_id="g-1", client_timeout=30)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), _mlp_expected(mlp_reference, x), rtol=1e-4, atol=1e-5)
        assert result.get_response().id == "g-1"

        with pytest.raises(InferenceServerException) as info:
            client.infer("mlp", [_input(grpcclient, "INPUT0", x[:, :7])])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "INPUT0" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("nope", [_input(grpcclient, "INPUT0", x)])
        assert info.value.status() == "StatusCode.NOT_FOUND"

        stats = client.get_inference_statistics("mlp").model_stats[0]
        assert stats.inference_count >= 5 and stats.inference_stats.success.count >= 1
        # queue and compute times come from the batcher and the worker (Triton's server-side breakdown)
        success = stats.inference_stats.success
        assert stats.inference_stats.queue.count == success.count and stats.inference_stats.queue.ns > 0
        assert stats.inference_stats.compute_infer.count == success.count
        assert 0 < stats.inference_stats.compute_infer.ns < success.ns
        assert stats.batch_stats and stats.execution_count >= 1
    finally:
        client.close()


def test_concurrent_requests_each_get_their_own_rows(cluster: Services) -> None:
    """Concurrent requests are batched together in the worker; each answer holds its own data."""
    arrays = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(48)]

    def one(array: np.ndarray) -> np.ndarray:
        client = _http(cluster)
        try:
            return client.infer("identity", [_input(httpclient, "INPUT0", array)]).as_numpy("OUTPUT0")
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, arrays))
    for array, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result, array)


def _cuda_runtime_dir() -> Path | None:
    for candidate in (REPO_ROOT / ".venv-peers" / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"):
        return candidate
    return None


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_unmodified(cluster: Services, protocol: str) -> None:
    cudart = _cuda_runtime_dir()
    if not PERF_ANALYZER.exists() or cudart is None:
        pytest.skip("perf_analyzer is not installed (scripts/bench/setup_peers.sh)")
    port = cluster.http_port if protocol == "http" else cluster.grpc_port
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    proc = subprocess.run(
        [
            str(PERF_ANALYZER), "-m", "mlp", "-u", f"127.0.0.1:{port}", "-i", protocol, "-b", "4",
            "--concurrency-range", "1", "--measurement-mode", "count_windows", "--measurement-request-count", "50",
            "--stability-percentage", "1000", "--max-trials", "3",
        ],
        capture_output=True, text=True, timeout=90, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Server-side statistics were read and parsed (the "statistics" extension).
    assert "Server:" in proc.stdout and "Successful request count" in proc.stdout, proc.stdout
