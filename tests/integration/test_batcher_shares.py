"""Issue 17, "Batcher replicas share a model's capacity": with 1, 2 or 3 batchers (and 1 or 2 routers) the
batches in flight on the workers never exceed their slots, and no request fails.

Two workers run the `shared` delay model two batches at a time each (4 slots). Under a load of 48 clients:
- each worker's peak of batches in flight for the model (unimodel_worker_inflight_batches_peak) is at most
  its 2 slots;
- the batchers' in-flight limits for the model (BatcherService.ListQueues) add up to the 4 slots exactly
  (core/capacity_shares.py) and their batches in flight never add up to more;
- the workers refuse (busy) almost no batch: the shares, not the refusals, keep the limit. The batchers send
  batches straight to the workers (issue 19), each to the slots the same split gives it
  (core/capacity_shares.py `owned`), so however many routers there are, two batchers never pick the same
  free slot (0 refusals measured in every configuration).
With 3 batchers and a single slot (fewer slots than batchers) the slot goes round and every batcher's
requests are served.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from helpers.predict_load import PredictLoad
from helpers.support import Infra, Services, delay_model, etcd_instances, register_model
from unimodel.local.procs import free_port
from unimodel.v1 import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

MODEL = "shared"
DELAY_MS = 40


class Cluster:
    def __init__(self, services: Services, workers: dict[str, int], batchers: dict[str, int]) -> None:
        self.services = services
        self.worker_metrics = workers  # worker id -> metrics port
        self.batcher_metrics = batchers  # batcher id -> metrics port

    def batches_ok(self, batcher: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.batcher_metrics[batcher]}/metrics", timeout=5).text
        found = re.search(rf'^unimodel_batcher_batches_total{{model="{MODEL}",result="ok"}} ([0-9.e+-]+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    def metric(self, worker: str, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.worker_metrics[worker]}/metrics", timeout=5).text
        found = re.search(rf'^{name}{{model="{MODEL}"}} ([0-9.e+-]+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    def queues(self) -> list[tuple[str, int, int]]:
        """(batcher, max in flight, in flight) of the model, from every batcher's ListQueues."""
        out = []
        for info in etcd_instances(self.services.infra, "batcher").values():
            with grpc.insecure_channel(info.grpc_address) as channel:
                reply = services_pb2_grpc.BatcherServiceStub(channel).ListQueues(
                    services_pb2.ListQueuesRequest(model=MODEL), timeout=5
                )
            out += [(info.id, q.max_inflight_batches, q.inflight_batches) for q in reply.queues if q.model == MODEL]
        return out


def _start(tmp_path: Path, batchers: int, routers: int, workers: int, slots: int) -> tuple[Infra, Services, Cluster]:
    infra = Infra(tmp_path)
    services = Services(infra)
    infra.start()
    for i in range(routers):
        services.start("router", "--instance-id", f"router-{i}", name=f"router-{i}")
    batcher_ports = {f"batcher-{i}": free_port() for i in range(batchers)}
    for batcher, port in batcher_ports.items():
        services.start("batcher", "--instance-id", batcher, "--metrics-port", str(port), name=batcher)
    ports = {f"worker-{i}": free_port() for i in range(workers)}
    for worker, port in ports.items():
        services.start(
            "gpu-worker", "--instance-id", worker, "--max-concurrent-batches", str(slots), "--metrics-port", str(port),
            name=worker,
        )
    register_model(infra, delay_model(MODEL, DELAY_MS, max_batch_size=8, max_queue_delay_ms=5))
    services.start_gateway()
    services.wait_models([MODEL], instances=workers)
    return infra, services, Cluster(services, ports, batcher_ports)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[tuple[Infra, Services]]]:
    held: list[tuple[Infra, Services]] = []
    yield held
    for infra, services in held:
        services.stop()
        infra.stop()


@pytest.mark.parametrize(("batchers", "routers"), [(1, 1), (2, 1), (3, 1), (3, 2)])
def test_batchers_together_never_put_more_batches_on_the_workers_than_their_slots(
    started: list[tuple[Infra, Services]], tmp_path: Path, batchers: int, routers: int
) -> None:
    infra, services, cluster = _start(tmp_path, batchers, routers, workers=2, slots=2)
    started.append((infra, services))
    samples: list[list[tuple[str, int, int]]] = []
    with PredictLoad(services.url, MODEL, clients=48) as load:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            samples.append(cluster.queues())
            time.sleep(0.1)
    assert not load.failures(), load.failures()[:5]
    assert load.ok > 200, load.ok
    peaks = {w: cluster.metric(w, "unimodel_worker_inflight_batches_peak") for w in cluster.worker_metrics}
    busy = sum(cluster.metric(w, "unimodel_worker_batches_busy_total") for w in cluster.worker_metrics)
    settled = [s for s in samples[10:] if len(s) == batchers]  # every batcher has its queue and shares
    print(f"{batchers} batcher(s), {routers} router(s): {load.ok} answers, worker peaks {peaks}, busy refusals "
          f"{busy:.0f}, batcher limits {[[q[1] for q in s] for s in settled[-1:]]}")
    assert all(peak <= 2 for peak in peaks.values()), peaks
    assert settled, samples[-3:]
    for sample in settled:
        assert sum(q[1] for q in sample) == 4, sample  # the shares add up to the slots
        assert sum(q[2] for q in sample) <= 4, sample
    assert busy <= 0.05 * load.ok, (busy, load.ok)  # each batcher uses its own slots: the workers rarely refuse one


def test_fewer_slots_than_batchers_go_round(started: list[tuple[Infra, Services]], tmp_path: Path) -> None:
    infra, services, cluster = _start(tmp_path, batchers=3, routers=1, workers=1, slots=1)
    started.append((infra, services))
    with PredictLoad(services.url, MODEL, clients=12) as load:
        time.sleep(5)
    assert not load.failures(), load.failures()[:5]
    assert load.ok > 50, load.ok
    assert cluster.metric("worker-0", "unimodel_worker_inflight_batches_peak") == 1
    sent = {b: cluster.batches_ok(b) for b in cluster.batcher_metrics}
    print(f"3 batchers, 1 slot: {load.ok} answers, batches per batcher {sent}")
    assert all(n > 0 for n in sent.values()), sent  # every batcher had its turns
