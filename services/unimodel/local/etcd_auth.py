"""`unimodel etcd-auth`: turn etcd's authentication on for UniModel, or rotate the services' password.

Creates (or updates) etcd's `root` user and the services' user (`--etcd-user`, default `unimodel`) with a
role that may read and write only keys under the prefix, then enables authentication. Run once per etcd
cluster before the services start (compose's `etcd-auth` job, the Kubernetes Job in
deploy/k8s/jobs/etcd-auth.yaml); running it again with a new services' password changes that password.
Passwords come from files or the environment, never from the command line.

Exit status: 0 done, 1 etcd refused (the message names why), 2 bad options.
"""

from __future__ import annotations

import asyncio
import sys
from typing import ClassVar

import grpc
from aetcd import rpc
from pydantic import Field

from unimodel.core.settings import CommonSettings, LocalPath, SettingsError, load_settings, register_settings
from unimodel.core.transport_security import CredentialsError, TlsFiles, read_secret

PROG = "unimodel etcd-auth"
READWRITE = 2  # etcd's authpb.Permission.Type


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with prefix (etcd's --prefix)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def _exists(exc: grpc.aio.AioRpcError) -> bool:
    return "already exists" in (exc.details() or "")


async def secure(
    endpoint: str, root_password: str, user: str, password: str, prefix: str, tls: TlsFiles | None = None
) -> str:
    """Make etcd at `endpoint` require authentication; returns what was done (one line)."""
    tls = tls or TlsFiles()
    if tls.enabled:
        ca, key, cert = tls.grpc_credentials()
        channel = grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.aio.insecure_channel(endpoint)
    try:
        auth = rpc.AuthStub(channel)
        try:
            enabled = (await auth.AuthStatus(rpc.AuthStatusRequest(), timeout=10)).enabled
        except grpc.aio.AioRpcError:
            enabled = True  # an anonymous AuthStatus is refused once authentication is on
        metadata: tuple[tuple[str, str], ...] = ()
        if enabled:
            token = (await auth.Authenticate(rpc.AuthenticateRequest(name="root", password=root_password), timeout=10)).token
            metadata = (("token", token),)

        async def add_user(name: str, secret: str) -> None:
            try:
                await auth.UserAdd(rpc.AuthUserAddRequest(name=name, password=secret), metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if not _exists(exc):
                    raise
                await auth.UserChangePassword(
                    rpc.AuthUserChangePasswordRequest(name=name, password=secret), metadata=metadata, timeout=10
                )

        if not enabled:
            await add_user("root", root_password)
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), metadata=metadata, timeout=10)
        await add_user(user, password)
        try:
            await auth.RoleAdd(rpc.AuthRoleAddRequest(name=user), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if not _exists(exc):
                raise
        key = prefix.encode()
        perm = rpc.Permission(permType=READWRITE, key=key, range_end=_prefix_end(key))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=user, perm=perm), metadata=metadata, timeout=10)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=user), metadata=metadata, timeout=10)
        if enabled:
            return f"etcd authentication was on; user {user!r} (keys under {prefix}) updated"
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)
        return f"etcd authentication enabled: users 'root' and {user!r} (keys under {prefix})"
    finally:
        await channel.close()


@register_settings
class EtcdAuthSettings(CommonSettings):
    """The services' etcd settings (endpoints, prefix, user, password, TLS) and root's password."""

    service: ClassVar[str] = "etcd-auth"

    etcd_root_password_file: LocalPath = Field("", description="file holding etcd's root password (required)")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(EtcdAuthSettings, argv, prog=PROG)
        assert isinstance(settings, EtcdAuthSettings)
        root_password = read_secret("", settings.etcd_root_password_file, "etcd root password")
        credentials = settings.etcd_auth().credentials()
    except (SettingsError, CredentialsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not root_password or credentials is None:
        print(f"{PROG}: error: give root's password (--etcd-root-password-file) and the services' user "
              "(--etcd-user with --etcd-password-file)", file=sys.stderr)
        return 2
    host, port = settings.etcd_endpoint_list[0]
    try:
        done = asyncio.run(secure(f"{host}:{port}", root_password, *credentials, settings.etcd_prefix, settings.etcd_auth().tls))
    except grpc.aio.AioRpcError as exc:
        print(f"{PROG}: error: etcd {host}:{port}: {exc.details() or exc.code().name}", file=sys.stderr)
        return 1
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
