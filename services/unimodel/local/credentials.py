"""Credentials of a local cluster (`unimodel up`, the test infrastructure): one NATS user per service, the
etcd `root` user and the `unimodel` user the services use, each password a random file under
`<state>/auth/` (folder 0700, files 0600), made once and reused by later runs on the same state (etcd's
data keeps its users). Services get the *paths* (UNIMODEL_*_PASSWORD_FILE), never a secret on their
command line, where `ps` would show it.

`unimodel up` goes one step further: every process it starts gets a NATS user of its own, named by the
instance id `up` chose for it, with a password made for that run (`<state>/auth/instances/<id>.password`)
and permissions that let it read only its own subjects (subjects.permissions). A process that exits takes
its user with it: a restart is a new instance id and a new user.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from unimodel.core import nats_config
from unimodel.core.kinds import SERVICE_KINDS
from unimodel.core.subjects import Permissions
from unimodel.core.transport_security import EtcdAuth, NatsAuth

AUTH_DIR = "auth"
ETCD_ROOT = "root"
ETCD_USER = "unimodel"
"""The etcd user every service connects as; its role may read and write only under the key prefix."""
NATS_CONFIG = "nats-server.conf"
INSTANCES_DIR = "instances"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600 from creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


COMPOSE_SECRETS = ("postgres-cache",)
"""Passwords compose needs besides NATS and etcd: the cache's PostgreSQL user (compose/docker-compose.yml)."""


@dataclass(frozen=True)
class LocalCredentials:
    folder: Path

    @classmethod
    def ensure(cls, state_dir: Path, extra_nats_users: tuple[str, ...] = ()) -> LocalCredentials:
        """The credentials under `state_dir/auth`, making the missing ones."""
        return cls.ensure_in(state_dir.resolve() / AUTH_DIR, extra_nats_users)

    @classmethod
    def ensure_in(
        cls, folder: Path, extra_nats_users: tuple[str, ...] = (), extra_secrets: tuple[str, ...] = ()
    ) -> LocalCredentials:
        """The credentials in `folder` itself, making the missing ones (and `<name>.password` for each of
        `extra_secrets`, e.g. COMPOSE_SECRETS)."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        creds = cls(folder)
        names = [
            *(f"nats-{k}" for k in SERVICE_KINDS), *(f"nats-{u}" for u in extra_nats_users), "etcd-root", f"etcd-{ETCD_USER}",
            *extra_secrets,
        ]
        for name in names:
            path = creds._file(name)
            if not path.is_file() or not path.read_text().strip():
                write_private(path, secrets.token_urlsafe(32) + "\n")
        return creds

    @classmethod
    def find(cls, state_dir: Path) -> LocalCredentials | None:
        """The credentials a cluster made under `state_dir`, or None."""
        folder = state_dir.resolve() / AUTH_DIR
        creds = cls(folder)
        return creds if creds.etcd_password_file.is_file() else None

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.password"

    def _read(self, name: str) -> str:
        return self._file(name).read_text().strip()

    def nats_password_file(self, user: str) -> Path:
        return self._file(f"nats-{user}")

    @property
    def etcd_password_file(self) -> Path:
        return self._file(f"etcd-{ETCD_USER}")

    @property
    def etcd_root_password(self) -> str:
        return self._read("etcd-root")

    @property
    def etcd_password(self) -> str:
        return self._read(f"etcd-{ETCD_USER}")

    # one NATS user per instance (`unimodel up`) ------------------------------------------------------
    @property
    def instances_folder(self) -> Path:
        return self.folder / INSTANCES_DIR

    def instance_password_file(self, instance_id: str) -> Path:
        return self.instances_folder / f"{instance_id}.password"

    def mint_instance(self, instance_id: str) -> Path:
        """A new random password for the NATS user `instance_id` (0600); its path."""
        self.instances_folder.mkdir(mode=0o700, exist_ok=True)
        path = self.instance_password_file(instance_id)
        write_private(path, secrets.token_urlsafe(32) + "\n")
        return path

    def drop_instance(self, instance_id: str) -> None:
        self.instance_password_file(instance_id).unlink(missing_ok=True)

    def drop_all_instances(self) -> None:
        """Every instance's password (a stopped cluster's, or one a crashed `up` left behind)."""
        if self.instances_folder.is_dir():
            for path in self.instances_folder.glob("*.password"):
                path.unlink(missing_ok=True)

    def instance_env(self, kind: str, instance_id: str) -> dict[str, str]:
        """The UNIMODEL_* variables of a process that is instance `instance_id` of `kind`, with a NATS
        user of its own (mint_instance first) and the etcd user."""
        return {
            **self.service_env(kind),
            "UNIMODEL_INSTANCE_ID": instance_id,
            "UNIMODEL_NATS_USER": instance_id,
            "UNIMODEL_NATS_PASSWORD_FILE": str(self.instance_password_file(instance_id)),
        }

    def nats_auth(self, user: str) -> NatsAuth:
        return NatsAuth(user=user, password_file=str(self.nats_password_file(user)))

    def etcd_auth(self) -> EtcdAuth:
        return EtcdAuth(user=ETCD_USER, password_file=str(self.etcd_password_file))

    def service_env(self, kind: str) -> dict[str, str]:
        """The UNIMODEL_* variables that give a service of `kind` its NATS user and the etcd user."""
        return {
            "UNIMODEL_NATS_USER": kind,
            "UNIMODEL_NATS_PASSWORD_FILE": str(self.nats_password_file(kind)),
            "UNIMODEL_ETCD_USER": ETCD_USER,
            "UNIMODEL_ETCD_PASSWORD_FILE": str(self.etcd_password_file),
        }

    def etcdctl_env(self) -> dict[str, str]:
        """etcdctl's environment for the root user (ETCDCTL_USER, so not on its command line)."""
        return {"ETCDCTL_USER": f"{ETCD_ROOT}:{self.etcd_root_password}"}

    def write_nats_config(
        self, extra_users: dict[str, Permissions] | None = None, instances: dict[str, str] | None = None,
        max_payload: int = nats_config.MAX_PAYLOAD,
    ) -> Path:
        """The nats-server configuration (0600) with `extra_users` and either one user per service kind
        or, with `instances` (instance id -> kind, each minted), one user per instance and none per kind;
        messages up to `max_payload` bytes."""
        if instances is None:
            passwords = {kind: self._read(f"nats-{kind}") for kind in SERVICE_KINDS}
            own: dict[str, tuple[str, str]] = {}
        else:
            passwords = {}
            own = {iid: (kind, self.instance_password_file(iid).read_text().strip()) for iid, kind in instances.items()}
        extra = {name: (self._read(f"nats-{name}"), perms) for name, perms in (extra_users or {}).items()}
        path = self.folder / NATS_CONFIG
        config = nats_config.render_server_config(passwords, extra_users=extra, instances=own, max_payload=max_payload)
        write_private(path, config)
        return path


def main(argv: list[str] | None = None) -> int:
    """`unimodel credentials DIR`: the files compose mounts as secrets (compose/docker-compose.yml)."""
    parser = argparse.ArgumentParser(
        prog="unimodel credentials",
        description="Make random passwords (one NATS user per service, etcd root, the services' etcd user and "
        "the cache's PostgreSQL user) "
        "and the nats-server configuration with each service's permissions in DIR (0700; files 0600). Existing "
        "password files are kept; delete one to rotate it, then run this again and restart NATS and the services.",
    )
    parser.add_argument("folder", type=Path, help="where to write them (e.g. compose/secrets)")
    args = parser.parse_args(argv)
    creds = LocalCredentials.ensure_in(args.folder.expanduser().resolve(), extra_secrets=COMPOSE_SECRETS)
    config = creds.write_nats_config()
    print(f"credentials in {creds.folder}; nats-server configuration {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
