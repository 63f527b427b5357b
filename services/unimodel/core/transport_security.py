"""Credentials and TLS for the connections to NATS and etcd, from the settings (core/settings.py).

Plain values and file reading, no sockets: `NatsAuth.connect_options()` is what `nats.connect` takes,
`EtcdAuth` what store.EtcdStore uses. A secret given as a file (`*_file`, e.g. a mounted Kubernetes
Secret) is read when a connection is made, so a rotated file is picked up by the next (re)connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CredentialsError(Exception):
    """A credentials or TLS file cannot be read; one line naming it."""


def read_secret(value: str, file: str, what: str) -> str:
    """`value`, or the content of `file` (surrounding whitespace stripped) when it is set."""
    if not file:
        return value
    try:
        return Path(file).read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} file {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"the {what} file {file} is not text") from None


def _read_bytes(file: str, what: str) -> bytes:
    try:
        return Path(file).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} file {file}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the CA that signs the server's certificate, and this client's certificate and key
    (for servers that require client certificates). All empty: no TLS."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context verifying the server against `ca_file` (the system CAs when unset)."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file or None)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cannot load TLS files ({self.ca_file or '-'}, {self.cert_file or '-'}): {exc}") from None
        return ctx

    def grpc_credentials(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(root CA, client key, client certificate) for grpc.ssl_channel_credentials."""
        ca = _read_bytes(self.ca_file, "etcd TLS CA") if self.ca_file else None
        key = _read_bytes(self.key_file, "etcd TLS key") if self.key_file else None
        cert = _read_bytes(self.cert_file, "etcd TLS certificate") if self.cert_file else None
        return ca, key, cert


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How a service proves who it is to NATS: user/password, token, nkey seed or creds file (one), and TLS."""

    user: str = ""
    password: str = ""
    password_file: str = ""
    token: str = ""
    token_file: str = ""
    nkey_seed_file: str = ""
    creds_file: str = ""
    tls: TlsFiles = TlsFiles()
    tls_hostname: str = ""

    @property
    def anonymous(self) -> bool:
        return not (self.user or self.token or self.token_file or self.nkey_seed_file or self.creds_file)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect (secrets read from their files now)."""
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = read_secret(self.password, self.password_file, "NATS password")
        token = read_secret(self.token, self.token_file, "NATS token")
        if token:
            opts["token"] = token
        if self.nkey_seed_file:
            opts["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        if self.tls.enabled:
            opts["tls"] = self.tls.ssl_context()
            if self.tls_hostname:
                opts["tls_hostname"] = self.tls_hostname
        return opts


@dataclass(frozen=True, slots=True)
class EtcdAuth:
    """An etcd user (its password read when connecting) and TLS."""

    user: str = ""
    password: str = ""
    password_file: str = ""
    tls: TlsFiles = TlsFiles()

    def credentials(self) -> tuple[str, str] | None:
        """(user, password), or None without a user."""
        if not self.user:
            return None
        return self.user, read_secret(self.password, self.password_file, "etcd password")
