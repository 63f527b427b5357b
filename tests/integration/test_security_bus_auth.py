"""Issue 15, finding "NATS and etcd have no authentication and no TLS": anyone who reached NATS could read
every prompt, forge replies, query or wipe any tenant's cache and command workers; anyone who reached etcd
could rewrite model configs. Against real servers: the embedded cluster's (`unimodel up`'s) NATS and etcd
refuse anonymous clients, a worker's NATS user cannot reach cache or batch subjects, and the services work
end to end with authentication on (etcd restart included)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from helpers.support import Infra, LogSink, Services, etcd_instances
from unimodel.core import subjects
from unimodel.core.bus import Bus
from unimodel.core.nats_config import ServerTls, render_server_config
from unimodel.core.store import EtcdStore, StoreError
from unimodel.core.transport_security import EtcdAuth, NatsAuth, TlsFiles
from unimodel.local import binaries
from unimodel.local.cluster import ClusterConfig, LocalCluster
from unimodel.local.procs import ManagedProcess, NatsServer, free_port, nats_accepts, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Infra]:
    infra = Infra(tmp_path, secure=True)
    try:
        infra.start()
        yield infra
    finally:
        infra.stop()


async def _client(url: str, auth: NatsAuth, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(url, allow_reconnect=False, error_cb=on_error, **auth.connect_options())


def test_finding_embedded_cluster_nats_and_etcd_accept_anonymous_clients(tmp_path: Path) -> None:
    cfg = ClusterConfig(state_dir=tmp_path / "state", nats_port=free_port(), etcd_port=free_port(), prepare_models=False)
    cluster = LocalCluster(cfg, sink=LogSink())
    try:
        cluster.start_bus_and_store()
        assert cluster.nats is not None and cluster.etcd is not None and cluster.credentials is not None
        # no secret on any command line (`ps` shows those)
        secrets = [f.read_text().strip() for f in cluster.credentials.folder.glob("*.password")]
        assert secrets and not any(s in " ".join(p.argv) for s in secrets for p in (cluster.nats, cluster.etcd))

        async def nats_refuses_anonymous() -> str:
            # the NATS protocol by hand (nats-py leaves its socket open when a connect is refused)
            reader, writer = await asyncio.open_connection(cluster.nats.host, cluster.nats.port)
            try:
                assert (await reader.readline()).startswith(b"INFO ")
                writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
                await writer.drain()
                answer = await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()
                await writer.wait_closed()
            assert cluster.instance_users is not None
            gateway = cluster.instance_users.renew("gateway")  # what `up` does for each process it starts
            auth = NatsAuth(user=gateway, password_file=str(cluster.credentials.instance_password_file(gateway)))
            nc = await nats.connect(cluster.nats.url, allow_reconnect=False, **auth.connect_options())
            await nc.close()  # a process's own credentials do connect
            return answer.decode()

        assert asyncio.run(nats_refuses_anonymous()).startswith("-ERR 'Authorization Violation'")

        async def etcd_put(store: EtcdStore, key: bytes) -> None:
            try:
                await store.put(key, b"forged")
            finally:
                await store.close()

        endpoint = [(cfg.host, cfg.etcd_port)]
        with pytest.raises(StoreError, match="user name is empty"):
            asyncio.run(etcd_put(EtcdStore(endpoint), b"/unimodel/v1/models/iris-classifier"))
        with pytest.raises(StoreError, match="permission denied"):  # the services' user: only under the prefix
            asyncio.run(etcd_put(EtcdStore(endpoint, auth=cluster.credentials.etcd_auth()), b"/elsewhere"))
        asyncio.run(etcd_put(EtcdStore(endpoint, auth=cluster.credentials.etcd_auth()), b"/unimodel/v1/test-key"))
    finally:
        cluster.stop()


def test_finding_a_worker_may_publish_to_cache_subjects_and_read_batches(secured: Infra) -> None:
    creds = secured.credentials
    assert creds is not None

    async def run() -> tuple[list[str], list[str], list[str]]:
        worker_errors: list[str] = []
        cache_errors: list[str] = []
        received: list[str] = []
        cache = await _client(secured.nats.address, creds.nats_auth("cache"), cache_errors)
        worker = await _client(secured.nats.address, creds.nats_auth("gpu-worker"), worker_errors)
        gateway = await _client(secured.nats.address, creds.nats_auth("gateway"), [])

        async def on_cache(msg: object) -> None:
            received.append(getattr(msg, "subject", ""))

        await cache.subscribe(subjects.CACHE_ALL, queue=subjects.QUEUE_CACHE, cb=on_cache)
        await cache.flush()
        # a gateway reaches the cache: the observation works
        await gateway.publish(subjects.CACHE_QUERY, b"from the gateway")
        await gateway.flush()
        wait = asyncio.get_running_loop().time() + 5
        while not received and asyncio.get_running_loop().time() < wait:
            await asyncio.sleep(0.05)
        assert received == [subjects.CACHE_QUERY]
        # a worker does not: nats-server answers a permissions violation and the cache receives nothing
        for subject in (subjects.CACHE_QUERY, subjects.CACHE_INSERT, subjects.CACHE_REMOVE, subjects.CACHE_LOG):
            await worker.publish(subject, b"forged")
        # nor may it read batches, bundles or another gateway's request inboxes
        stolen: list[str] = []

        async def on_stolen(msg: object) -> None:
            stolen.append(getattr(msg, "subject", ""))

        for subject in (subjects.BATCH_ALL, subjects.BUNDLE_ALL, f"{subjects.inbox_prefix('gateway', '*')}.>"):
            await worker.subscribe(subject, cb=on_stolen)
        await worker.flush()
        await gateway.publish(subjects.batch("echo"), b"a prompt")
        await gateway.publish(subjects.bundle("echo"), b"prompts")
        await gateway.flush()
        await asyncio.sleep(1.0)
        for nc in (worker, gateway, cache):
            await nc.close()
        return worker_errors, received, stolen

    errors, received, stolen = asyncio.run(run())
    assert received == [subjects.CACHE_QUERY] and stolen == []
    text = " ".join(errors).lower()  # nats-py lowercases the server's -ERR line
    for subject in (subjects.CACHE_QUERY, subjects.CACHE_INSERT, subjects.CACHE_REMOVE, subjects.CACHE_LOG):
        assert f'permissions violation for publish to "{subject}"' in text, text
    for subject in (subjects.BATCH_ALL, subjects.BUNDLE_ALL):
        assert f'permissions violation for subscription to "{subject}"' in text, text


def test_finding_a_worker_reads_other_workers_requests_up_gives_each_process_a_user_of_its_own(tmp_path: Path) -> None:
    """`unimodel up` mints a NATS user per process: worker A cannot read worker B's work, a gateway's
    answers or B's liveness probes; A's restart (a new instance) disconnects and retires A's old user."""
    cfg = ClusterConfig(
        state_dir=tmp_path / "state", nats_port=free_port(), etcd_port=free_port(), prepare_models=False, nats_tool_user="ops"
    )
    cluster = LocalCluster(cfg, sink=LogSink())
    try:
        cluster.start_bus_and_store()
        users, creds, nats_server = cluster.instance_users, cluster.credentials, cluster.nats
        assert users is not None and creds is not None and nats_server is not None
        a, b, gateway = users.renew("gpu-worker"), users.renew("gpu-worker"), users.renew("gateway")
        assert len({a, b, gateway}) == 3 and all(i.startswith(k) for i, k in ((a, "gpu-worker-"), (gateway, "gateway-")))

        def auth(instance: str) -> NatsAuth:
            return NatsAuth(user=instance, password_file=str(creds.instance_password_file(instance)))

        async def run() -> tuple[list[str], list[str], list[str], bool]:
            errors_a: list[str] = []
            worker_a = await _client(nats_server.address, auth(a), errors_a)
            router = await nats.connect(nats_server.url)  # the tool user: may publish anything
            got: list[str] = []

            async def on_msg(msg: object) -> None:
                got.append(getattr(msg, "subject", ""))

            theirs = (subjects.worker_infer(b), subjects.worker_control(b), subjects.alive(b), f"{subjects.replies(gateway)}.*",
                      subjects.WORKER_INFER_ALL, f"{subjects.inbox_prefix('gpu-worker', b)}.>")
            for subject in (*theirs, subjects.worker_infer(a)):
                await worker_a.subscribe(subject, cb=on_msg)
            await worker_a.flush()
            await asyncio.sleep(0.3)  # the server's -ERR lines arrive after the flush's PONG
            for subject in (subjects.worker_infer(b), subjects.worker_control(b), subjects.alive(b),
                            f"{subjects.replies(gateway)}.{os.urandom(16).hex()}", subjects.worker_infer(a)):
                await router.publish(subject, b"work")
            await router.flush()
            await asyncio.sleep(0.5)
            # A is restarted: a new instance with a new user; the old user is gone and its connection closed
            old_password = creds.instance_password_file(a).read_text().strip()
            renewed = users.renew("gpu-worker", a)
            await asyncio.sleep(0.5)
            old_dropped = not worker_a.is_connected and not creds.instance_password_file(a).exists()
            refused = not await asyncio.to_thread(nats_accepts, nats_server.host, nats_server.port, a, old_password)
            admitted = await asyncio.to_thread(
                nats_accepts, nats_server.host, nats_server.port, renewed, creds.instance_password_file(renewed).read_text().strip()
            )
            await worker_a.close()
            await router.close()
            return errors_a, got, list(theirs), old_dropped and refused and admitted

        errors, got, theirs, restarted = asyncio.run(run())
        assert got == [subjects.worker_infer(a)], got  # only its own work reached worker A
        text = " ".join(errors).lower()
        for subject in theirs:
            assert f'permissions violation for subscription to "{subject.lower()}"' in text, (subject, text)
        assert restarted
    finally:
        cluster.stop()
    assert not list((tmp_path / "state" / "auth" / "instances").glob("*.password"))  # stop retires every instance user


def test_finding_services_run_with_authentication_and_survive_an_etcd_restart(secured: Infra) -> None:
    services = Services(secured)
    try:
        services.start_cluster(workers=1, all_six=False)
        assert services.predict("hi").json() == {"model": "echo", "output": "hi"}
        # etcd restarts: its auth tokens are gone; the services authenticate again and register again
        secured.stop_etcd()
        secured.start_etcd()
        wait_until(lambda: "worker-0" in {k.rsplit("/", 1)[-1] for k in etcd_instances(secured, "gpu-worker")}, 60,
                   "worker-0 registered again")
        wait_until(lambda: services.predict("again").status_code == 200, 30, "a prediction after the etcd restart")
        assert services.predict("again").json()["output"] == "again"
        log = secured.sink.getvalue()
        assert "Permissions Violation" not in log and "Authorization Violation" not in log
    finally:
        services.stop()


def test_finding_etcd_of_a_deployment_stays_open_etcd_auth_turns_it_on_and_rotates(tmp_path: Path) -> None:
    infra = Infra(tmp_path, secure=False)  # an etcd as a deployment starts it: no authentication
    try:
        infra.start()
        (tmp_path / "root").write_text("root-secret\n")
        (tmp_path / "services").write_text("first\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")} | {
            "UNIMODEL_ETCD_ENDPOINTS": infra.etcd.endpoint, "UNIMODEL_ETCD_USER": "unimodel",
            "UNIMODEL_ETCD_PASSWORD_FILE": str(tmp_path / "services"),
        }

        def etcd_auth() -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "unimodel.cli", "etcd-auth", "--etcd-root-password-file", str(tmp_path / "root")]
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

        def put(auth: EtcdAuth, key: bytes = b"/unimodel/v1/models/x") -> None:
            async def run() -> None:
                store = EtcdStore([("127.0.0.1", infra.etcd.port)], auth=auth)
                try:
                    await store.put(key, b"v")
                finally:
                    await store.close()

            asyncio.run(run())

        put(EtcdAuth())  # open before
        done = etcd_auth()
        assert done.returncode == 0 and "etcd authentication enabled" in done.stdout, done.stderr
        services = EtcdAuth(user="unimodel", password_file=str(tmp_path / "services"))
        put(services)
        with pytest.raises(StoreError, match="user name is empty"):
            put(EtcdAuth())
        with pytest.raises(StoreError, match="permission denied"):
            put(services, b"/other")
        # rotation: a new password for the services' user; the old one stops working
        (tmp_path / "services").write_text("second\n")
        done = etcd_auth()
        assert done.returncode == 0 and "updated" in done.stdout, done.stderr
        put(services)
        with pytest.raises(StoreError, match="authentication failed"):
            put(EtcdAuth(user="unimodel", password="first"))
    finally:
        infra.stop()


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    cert, key = folder / "server.pem", folder / "server-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_finding_nats_and_etcd_have_no_tls_services_connect_over_tls(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    tls = TlsFiles(ca_file=str(cert), cert_file=str(cert), key_file=str(key))
    sink = LogSink()
    config = tmp_path / "nats.conf"
    config.write_text(render_server_config(
        {"gateway": "pw"}, tls=ServerTls(str(cert), str(key), ca_file=str(cert), verify=True)
    ))
    nats_server = NatsServer(free_port(), tmp_path / "nats", config_file=config, sink=sink)
    etcd_port, peer_port = free_port(), free_port()
    etcd = ManagedProcess("etcd", [
        str(binaries.etcd()), "--data-dir", str(tmp_path / "etcd"),
        "--listen-client-urls", f"https://127.0.0.1:{etcd_port}", "--advertise-client-urls", f"https://127.0.0.1:{etcd_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
        "--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth", "--trusted-ca-file", str(cert),
        "--log-level", "warn",
    ], sink=sink)
    try:
        nats_server.start_and_wait()
        etcd.start()

        async def run() -> tuple[bytes, bytes]:
            bus = Bus([nats_server.address], "tls-test", auth=NatsAuth(user="gateway", password="pw", tls=tls))
            await bus.connect()
            try:
                got: asyncio.Queue[bytes] = asyncio.Queue()

                async def on_msg(msg: object) -> None:
                    got.put_nowait(getattr(msg, "data", b""))

                await bus.subscribe(subjects.alive("gw-1"), on_msg)
                await bus.client().publish(subjects.alive("gw-1"), b"over tls")
                received = await asyncio.wait_for(got.get(), 5)
            finally:
                await bus.close()
            store = EtcdStore([("127.0.0.1", etcd_port)], call_timeout_s=5, auth=EtcdAuth(tls=tls))
            try:
                deadline = asyncio.get_running_loop().time() + 30
                while True:  # etcd is starting
                    try:
                        await store.put(b"/unimodel/v1/tls", b"ok")
                        break
                    except StoreError:
                        if asyncio.get_running_loop().time() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                kvs, _ = await store.get_prefix(b"/unimodel/v1/")
            finally:
                await store.close()
            return received, kvs[b"/unimodel/v1/tls"]

        assert asyncio.run(run()) == (b"over tls", b"ok")

        async def plain_etcd() -> None:  # no TLS against the TLS port: refused
            store = EtcdStore([("127.0.0.1", etcd_port)], call_timeout_s=2)
            try:
                await store.put(b"/unimodel/v1/x", b"y")
            finally:
                await store.close()

        with pytest.raises(StoreError):
            asyncio.run(plain_etcd())
    finally:
        etcd.stop()
        nats_server.stop()
