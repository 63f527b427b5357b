"""KServe statistics of the cluster (gateway/kserve/cluster_stats.py): two gateways over one real cluster, each
serving part of the requests; either gateway's statistics, over HTTP and gRPC, count all of them."""

from __future__ import annotations

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from helpers.support import Services
from unimodel.local.procs import free_port, http_ok, wait_until


def test_either_gateway_reports_the_requests_both_served(services: Services) -> None:
    services.start_cluster(all_six=False)
    second_http, second_grpc = free_port(), free_port()
    second = services.start("gateway", "--http-port", str(second_http), "--grpc-port", str(second_grpc), name="gateway-2")
    wait_until(lambda: http_ok(f"http://127.0.0.1:{second_http}/health/ready"), 60, "second gateway ready", second)
    first_url, second_url = services.url, f"http://127.0.0.1:{second_http}"

    def count(url: str) -> int:
        doc = httpx.get(f"{url}/v2/models/echo/stats", timeout=10).json()
        return doc["model_stats"][0]["inference_stats"]["success"]["count"]

    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    for url, n in ((first_url, 5), (second_url, 3)):
        for _ in range(n):
            assert httpx.post(f"{url}/v2/models/echo/infer", json=doc, timeout=10).status_code == 200
    wait_until(lambda: count(first_url) == 8 and count(second_url) == 8, 10, "both gateways' statistics count all 8")
    stats = httpx.get(f"{second_url}/v2/models/stats", timeout=10).json()["model_stats"]
    echo = next(m for m in stats if m["name"] == "echo")
    assert echo["inference_count"] == 8 and echo["inference_stats"]["compute_infer"]["count"] == 8

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{second_grpc}")
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("echo", [inp])
    reply = client.get_inference_statistics("echo", as_json=True)
    assert int(reply["model_stats"][0]["inference_stats"]["success"]["count"]) == 9
