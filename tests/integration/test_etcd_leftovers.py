"""`unimodel up` reuses its etcd data dir: the registrations of a previous run's processes (killed, so never
deregistered) are removed at start instead of showing as UNREACHABLE instances for one more lease TTL."""

from __future__ import annotations

from pathlib import Path

from helpers.support import Infra


def test_revoking_the_leases_removes_the_dead_registrations_and_keeps_the_rest(tmp_path: Path) -> None:
    infra = Infra(tmp_path)
    try:
        infra.start()
        lease = infra.etcdctl("lease", "grant", "600").split()[1]
        infra.etcdctl("put", "--lease", lease, "/unimodel/v1/instances/gpu-worker/gone", "x")
        infra.etcdctl("put", "/unimodel/v1/models/mlp", "y")  # desired state: no lease, stays
        assert infra.etcd.revoke_leases() == 1
        keys = infra.etcdctl("get", "--prefix", "--keys-only", "/unimodel/").split()
        assert keys == ["/unimodel/v1/models/mlp"]
        assert infra.etcd.revoke_leases() == 0
    finally:
        infra.stop()
