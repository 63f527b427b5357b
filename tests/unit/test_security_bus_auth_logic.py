"""Issue 15, finding "NATS and etcd have no authentication and no TLS": the plain logic (no network): the
settings, the per-service NATS permissions, the nats-server config they render to, and the local
cluster's credential files."""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helpers.deploy_checks import K8S_DIR, compose, environment, unimodel_services
from unimodel.cli import COMMANDS
from unimodel.core import subjects
from unimodel.core.kinds import SERVICE_KINDS
from unimodel.core.nats_config import ServerTls, render_server_config
from unimodel.core.settings import CommonSettings, SettingsError, all_service_settings, load_settings
from unimodel.core.transport_security import CredentialsError, NatsAuth, TlsFiles
from unimodel.local.credentials import COMPOSE_SECRETS, LocalCredentials


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


CACHE_SUBJECTS = (subjects.CACHE_QUERY, subjects.CACHE_INSERT, subjects.CACHE_REMOVE, subjects.CACHE_LOG)


def test_finding_any_nats_client_may_publish_anywhere_worker_permissions_exclude_cache_and_control() -> None:
    for kind in ("gpu-worker", "embedding-worker"):
        perms = subjects.PERMISSIONS[kind]
        for subject in (*CACHE_SUBJECTS, subjects.batch("m"), subjects.bundle("m"), subjects.route("m"),
                        subjects.worker_infer("w2"), subjects.worker_control("w2"), subjects.ABORT, "_INBOX.gateway.x.1"):
            assert not allowed(perms.publish, subject), (kind, subject)
        for subject in (subjects.batch("m"), subjects.bundle("m"), *CACHE_SUBJECTS, subjects.replies("gateway-1") + ".3",
                        "_INBOX.gateway.x.1", subjects.route("m")):
            assert not allowed(perms.subscribe, subject), (kind, subject)
        # what a worker does need
        assert allowed(perms.publish, subjects.replies("gateway-1") + ".7") and allowed(perms.publish, subjects.LOAD)
        assert allowed(perms.subscribe, subjects.worker_infer("w1")) and allowed(perms.subscribe, subjects.ABORT)
        assert perms.responses  # its BatchAck to the router's request, its liveness answers


def test_finding_any_nats_client_may_publish_anywhere_each_service_gets_only_its_flows() -> None:
    perms = subjects.PERMISSIONS
    assert set(perms) == set(SERVICE_KINDS)
    # only the gateway talks to the cache; only the gateway aborts; only the router drives workers
    assert [k for k in perms if all(allowed(perms[k].publish, s) for s in CACHE_SUBJECTS)] == ["gateway"]
    assert [k for k in perms if allowed(perms[k].publish, subjects.ABORT)] == ["gateway"]
    assert [k for k in perms if allowed(perms[k].publish, subjects.worker_control("w"))] == ["router"]
    assert [k for k in perms if allowed(perms[k].publish, subjects.route("m"))] == ["batcher"]
    assert sorted(k for k in perms if allowed(perms[k].publish, subjects.batch("m"))) == ["cache", "gateway"]
    # every service reads only its own kind's request inboxes, and answers liveness probes
    for kind, p in perms.items():
        others = [k for k in perms if k != kind]
        assert not any(allowed(p.subscribe, f"{subjects.inbox_prefix(o, 'x')}.abc.1") for o in others), kind
        assert allowed(p.subscribe, subjects.alive(f"{kind}-1")), kind


def test_finding_a_worker_reads_other_workers_requests_an_instance_user_reads_only_its_own_subjects() -> None:
    """One user per instance (`unimodel up`): what it may read names its own id; publishing is as for its kind."""
    for kind in SERVICE_KINDS:
        mine, per_kind = subjects.permissions(kind, "me-1"), subjects.PERMISSIONS[kind]
        assert mine.publish == per_kind.publish and mine.responses == per_kind.responses, kind
        assert allowed(mine.subscribe, subjects.alive("me-1")) and not allowed(mine.subscribe, subjects.alive("other-2")), kind
        assert allowed(mine.subscribe, f"{subjects.inbox_prefix(kind, 'me-1')}.abc")
        assert not allowed(mine.subscribe, f"{subjects.inbox_prefix(kind, 'other-2')}.abc"), kind
        for other in (subjects.worker_infer("other-2"), subjects.worker_control("other-2"), subjects.replies("other-2") + ".ab12"):
            assert not allowed(mine.subscribe, other), (kind, other)
    worker = subjects.permissions("gpu-worker", "me-1")
    assert allowed(worker.subscribe, subjects.worker_infer("me-1")) and allowed(worker.subscribe, subjects.worker_control("me-1"))
    for kind in ("gateway", "cache"):  # the two kinds with a reply tree (replies.ReplyMux)
        assert allowed(subjects.permissions(kind, "me-1").subscribe, subjects.replies("me-1") + ".ab12")
    with pytest.raises(KeyError):
        subjects.permissions("spy", "x")


def test_finding_nats_has_no_users_the_rendered_config_lists_one_user_per_service() -> None:
    passwords = {kind: f"pw-{kind}" for kind in SERVICE_KINDS}
    text = render_server_config(passwords, tls=ServerTls("/c.pem", "/k.pem", "/ca.pem", verify=True))
    assert text.count("{ user: ") == len(SERVICE_KINDS)
    assert '{ user: "gpu-worker", password: "pw-gpu-worker", permissions: { publish: { allow: ["unimodel.v1.reply.*.*", ' in text
    assert "allow_responses: true" in text and 'ca_file: "/ca.pem"' in text and "verify: true" in text
    with pytest.raises(ValueError, match="no NATS permissions are defined for spy"):
        render_server_config({"spy": "x"})


def test_finding_no_nats_or_etcd_credentials_settings_read_secrets_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "nats.pw"
    secret.write_text("s3cret\n")
    settings = CommonSettings(nats_user="gateway", nats_password_file=str(secret), etcd_user="u", etcd_password="p")
    assert settings.nats_auth().connect_options() == {"user": "gateway", "password": "s3cret"}
    assert settings.etcd_auth().credentials() == ("u", "p")
    assert CommonSettings().nats_auth().connect_options() == {} and CommonSettings().etcd_auth().credentials() is None
    with pytest.raises(CredentialsError, match="cannot read the NATS password file"):
        NatsAuth(user="x", password_file=str(tmp_path / "missing")).connect_options()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nats-password", "x"], "nats_password needs nats_user"),
        (["--nats-user", "gateway"], "nats_user needs nats_password or nats_password_file"),
        (["--etcd-user", "u", "--etcd-password", "a", "--etcd-password-file", "/f"], "etcd_password and etcd_password_file are both set"),
        (["--nats-tls-cert-file", "/c.pem"], "nats_tls_cert_file and nats_tls_key_file go together"),
    ],
)
def test_finding_no_nats_or_etcd_credentials_bad_combinations_name_the_fields(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(CommonSettings, argv)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key (openssl), standing for a CA and a client certificate."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=nats.internal",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_finding_no_tls_ca_and_client_certificate_give_a_verifying_context(tmp_path: Path) -> None:
    assert not TlsFiles().enabled
    with pytest.raises(CredentialsError, match="cannot load TLS files"):
        TlsFiles(ca_file=str(tmp_path / "missing.pem")).ssl_context()
    cert, key = self_signed(tmp_path)
    settings = CommonSettings(
        nats_tls_ca_file=str(cert), nats_tls_cert_file=str(cert), nats_tls_key_file=str(key), nats_tls_hostname="nats.internal",
        etcd_tls_ca_file=str(cert), etcd_tls_cert_file=str(cert), etcd_tls_key_file=str(key),
    )
    opts = settings.nats_auth().connect_options()
    assert isinstance(opts["tls"], ssl.SSLContext) and opts["tls"].verify_mode == ssl.CERT_REQUIRED
    assert opts["tls_hostname"] == "nats.internal"
    ca, client_key, client_cert = settings.etcd_auth().tls.grpc_credentials()
    assert ca == client_cert == cert.read_bytes() and client_key == key.read_bytes()


def test_finding_local_cluster_is_open_credentials_are_private_files(tmp_path: Path) -> None:
    creds = LocalCredentials.ensure(tmp_path)
    assert stat.S_IMODE(creds.folder.stat().st_mode) == 0o700
    files = sorted(creds.folder.iterdir())
    assert len(files) == len(SERVICE_KINDS) + 2
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 and len(f.read_text().strip()) >= 40 for f in files)
    again = LocalCredentials.ensure(tmp_path)  # a second run keeps them (etcd's data keeps its users)
    assert again.etcd_password == creds.etcd_password
    env = creds.service_env("router")
    assert env["UNIMODEL_NATS_USER"] == "router" and Path(env["UNIMODEL_NATS_PASSWORD_FILE"]).is_file()
    assert creds.nats_password_file("router").read_text().strip() not in "".join(env.values())  # paths, not secrets
    config = creds.write_nats_config()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and '"router"' in config.read_text()
    assert LocalCredentials.find(tmp_path) is not None and LocalCredentials.find(tmp_path / "other") is None


# compose and Kubernetes: NATS and etcd credentials from secrets ---------------------------------------------
def test_finding_compose_leaves_nats_and_etcd_open_services_mount_their_own_credentials(tmp_path: Path) -> None:
    spec = compose()
    services = spec["services"]
    made = {p.name for p in LocalCredentials.ensure_in(tmp_path, extra_secrets=COMPOSE_SECRETS).folder.iterdir()} | {"nats-server.conf"}
    files = {name: Path(s["file"]).name for name, s in spec["secrets"].items()}
    assert set(files.values()) == made, "the compose secrets are the files `unimodel credentials` writes"
    assert services["nats"]["command"][:2] == ["-c", "/run/secrets/nats-server.conf"]
    assert services["nats"]["secrets"] == ["nats-server.conf"]
    assert services["etcd-auth"]["command"][0] == "etcd-auth" and services["etcd-auth"]["restart"] == "no"
    for name, svc in unimodel_services(spec).items():
        kind = str(svc["command"][0])
        if kind not in SERVICE_KINDS:
            continue
        env = environment(svc)
        assert env["UNIMODEL_NATS_PASSWORD_FILE"] == "/run/secrets/nats-password" and "UNIMODEL_NATS_USER" not in env, name
        assert env["UNIMODEL_ETCD_USER"] == "unimodel" and env["UNIMODEL_ETCD_PASSWORD_FILE"] == "/run/secrets/etcd-password"
        assert {"source": f"nats-{kind}", "target": "nats-password"} in svc["secrets"], name
        assert {"source": "etcd-unimodel", "target": "etcd-password"} in svc["secrets"], name
        assert svc["depends_on"]["etcd-auth"] == {"condition": "service_completed_successfully"}, name
        # the user defaults to the service's kind: the NATS user whose permissions it needs
        assert all_service_settings()[kind](nats_password_file="/x").nats_user == kind, name


def test_finding_kubernetes_leaves_nats_and_etcd_open_deployments_mount_the_bus_secret(tmp_path: Path) -> None:
    made = {p.name for p in LocalCredentials.ensure_in(tmp_path).folder.iterdir()}
    docs = [d for f in sorted((K8S_DIR / "base").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "unimodel-config")["data"]
    assert config["UNIMODEL_NATS_PASSWORD_FILE"] == "/run/secrets/unimodel/nats-password"
    assert config["UNIMODEL_ETCD_PASSWORD_FILE"] == "/run/secrets/unimodel/etcd-password"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(SERVICE_KINDS)
    (job,) = [d for d in yaml.safe_load_all((K8S_DIR / "jobs" / "etcd-auth.yaml").read_text()) if d]
    kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
    for name, obj in [*deployments.items(), ("etcd-auth", job)]:
        pod = obj["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "bus-credentials"]
        secret = volume["secret"]
        assert secret["secretName"] == "unimodel-bus-credentials" and not secret.get("optional"), name
        items = {i["path"]: i["key"] for i in secret["items"]}
        assert set(items.values()) <= made, f"{name}: keys `unimodel credentials` does not write"
        assert items["etcd-password"] == "etcd-unimodel.password", name
        if name != "etcd-auth":
            assert items["nats-password"] == f"nats-{name}.password", name
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "bus-credentials"]
        assert mount["mountPath"] == "/run/secrets/unimodel" and mount["readOnly"] is True, name
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] in COMMANDS


def test_finding_nats_has_no_users_a_config_without_users_stays_closed() -> None:
    """nats-server admits anyone when its users list is empty (`unimodel up` before its first process)."""
    text = render_server_config({})
    assert text.count("{ user: ") == 1 and '{ user: "unimodel-closed"' in text
    assert 'publish: { deny: [">"] }, subscribe: { deny: [">"] }' in text
    assert render_server_config({}) != text  # a password nobody knows, new each time
    per_instance = render_server_config({}, instances={"gpu-worker-ab12": ("gpu-worker", "pw")})
    assert "unimodel-closed" not in per_instance
    assert '"unimodel.v1.worker.gpu-worker-ab12.infer"' in per_instance and '"unimodel.v1.worker.*.infer"' not in per_instance
