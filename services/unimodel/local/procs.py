"""Child processes with prefixed logs, readiness checks and certain cleanup.

Used by `unimodel up` and by the test fixtures, so tests run the same infrastructure code users run.
Children die with their parent (PR_SET_PDEATHSIG on Linux) and are stopped by PID: SIGTERM, then
SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

from unimodel.core import nats_config
from unimodel.local import binaries

T = TypeVar("T")

_COLORS = ["36", "32", "33", "35", "34", "96", "92", "93", "95", "94"]
_print_lock = threading.Lock()


_handed_out: set[int] = set()
_port_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, never handed out before by this process, and outside the kernel's
    ephemeral range, so neither a sibling server nor an outgoing connection takes it before use.

    Binding port 0 twice may return the same port (the first socket is closed by then), and an
    ephemeral port can be grabbed by any client socket before the server binds it; both made etcd
    fail to start with "address already in use".
    """
    lo, hi = _ephemeral_range()
    pool = range(10000, lo) if lo - 10000 >= 5000 else range(hi + 1, 65536)
    rng = random.SystemRandom()
    with _port_lock:
        for _ in range(500):
            port = rng.choice(pool)
            if port not in _handed_out and not port_in_use(port, host, reuse=False):
                _handed_out.add(port)
                return port
        while True:  # pragma: no cover - only when the whole pool is busy
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_in_use(port: int, host: str = "127.0.0.1", *, reuse: bool = True) -> bool:
    with socket.socket() as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ManagedProcess:
    """One child process whose output lines are prefixed with its name."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        sink: IO[str] | None = None,
        color: int = 0,
        own_session: bool = True,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.sink = sink if sink is not None else sys.stdout
        self.color = _COLORS[color % len(_COLORS)]
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.lines: list[str] = []  # last lines, for error reports

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.lines = []
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=self.own_session,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._pump, name=f"log {self.name}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        tty = hasattr(self.sink, "isatty") and self.sink.isatty()
        prefix = f"\033[{self.color}m{self.name:>16} |\033[0m " if tty else f"{self.name:>16} | "
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.lines = [*self.lines[-49:], line]
            with _print_lock:
                try:
                    self.sink.write(prefix + line + "\n")
                    self.sink.flush()
                except (ValueError, OSError):
                    pass

    def restart(self) -> None:
        """Start the same command again, once the previous run has exited."""
        if self.alive():
            raise RuntimeError(f"{self.name} is still running")
        self._release()
        self.start()

    def reap_group(self) -> None:
        """Once the child has exited: SIGKILL what is left of its process group (its own session), e.g.
        the processes it spawned that do not watch their parent (vLLM's EngineCore after a kill -9)."""
        if self.own_session and self.proc is not None and self.proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _release(self) -> None:
        """The exited run's leftovers in its process group, log reader and pipe."""
        self.reap_group()
        if self._reader is not None:
            self._reader.join(2)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL now (the crash test)."""
        self.signal(signal.SIGKILL)
        self.wait(5)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(2)
        return code

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent."""
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal(signal.SIGKILL)
                self.wait(5)
        self._release()
        return self.proc.returncode


def wait_until(
    check: Callable[[], T], timeout: float, what: str, proc: ManagedProcess | None = None, every_s: float = 0.05
) -> T:
    """check()'s first truthy value, asked every `every_s`; TimeoutError naming `what` (and the last error
    check() raised, if any) after `timeout`, RuntimeError as soon as `proc` exits."""
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and not proc.alive():
            tail = " / ".join(proc.lines[-3:])
            raise RuntimeError(f"{proc.name} exited with code {proc.returncode()} before {what}: {tail}")
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def tcp_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


class NatsServer(ManagedProcess):
    """nats-server; with `config_file` (core/nats_config.py: users and their permissions, message size limits)
    only its users connect; without, anyone connects, and its limits (`max_payload`) come from a file of their
    own. `url_user` (user, password) puts one user's credentials into `url`, for clients (tests) that connect
    with the URL alone; `address` is the URL without them."""

    def __init__(
        self,
        port: int,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        url_user: tuple[str, str] | None = None,
        max_payload: int = nats_config.MAX_PAYLOAD,
        cluster: tuple[nats_config.ClusterNode, list[nats_config.ClusterNode]] | None = None,
        monitor_port: int = 0,
        **kw,
    ) -> None:
        self.host, self.port = host, port
        self.config_file, self.url_user = config_file, url_user
        self.monitor_port = monitor_port
        store_dir = store_dir.resolve()
        store_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(binaries.nats_server())]
        if config_file is None:  # no users: a file with the message size limits alone (no flag sets them)
            base = store_dir / "limits.conf"
            base.write_text(nats_config.limits_block(max_payload))
        else:  # core/nats_config.py renders the limits into it too
            base = config_file
        if cluster is not None:
            # one node of a cluster (`up --ha`): its own file, beside the users file it includes
            node, peers = cluster
            node_file = base.parent / f"{node.name}.conf"
            node_file.write_text(nats_config.render_cluster_node(node, peers, base.name))
            base = node_file
        argv += ["-c", str(base)]
        argv += ["-a", host, "-p", str(port), "-js", "-sd", str(store_dir)]
        if monitor_port:
            argv += ["-m", str(monitor_port)]
        if config_file is None and cluster is None:  # a server name given as a flag cannot be reloaded (SIGHUP) from a file
            argv += ["-n", f"unimodel-{port}"]
        super().__init__(kw.pop("name", "nats"), argv, **kw)

    @property
    def address(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        if self.url_user is None:
            return self.address
        user, password = self.url_user
        return f"nats://{user}:{password}@{self.host}:{self.port}"

    def start_and_wait(self, timeout: float = 15) -> None:
        self.start()
        wait_until(lambda: tcp_open(self.host, self.port), timeout, f"nats-server on port {self.port}", self)

    def reload(self, user: str = "", password: str = "", timeout: float = 10) -> None:
        """Make the server read its configuration file again (SIGHUP: users and permissions change, clients
        whose user is gone are disconnected); with `user`, return once that user is let in."""
        if self.proc is None or self.proc.poll() is not None:
            return  # not running: it reads the file when it starts
        self.proc.send_signal(signal.SIGHUP)
        if user:
            wait_until(lambda: nats_accepts(self.host, self.port, user, password), timeout, f"NATS user {user} after a reload", self)


def nats_accepts(host: str, port: int, user: str, password: str, timeout: float = 2.0) -> bool:
    """Whether a plain-TCP nats-server lets `user` in (the NATS client protocol, spoken directly: CONNECT,
    then PING answered by PONG, or -ERR 'Authorization Violation'). No client library: nothing to clean up."""
    try:
        # the file object holds the socket open after the socket's own close: both are closed here
        with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as reader:
            if not reader.readline().startswith(b"INFO"):
                return False
            connect = {"verbose": False, "pedantic": False, "user": user, "pass": password, "protocol": 1, "name": "probe"}
            sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            return reader.readline().startswith(b"PONG")
    except OSError:
        return False


def etcd_member_flags(
    name: str, host: str, port: int, peer_port: int, initial_cluster: str = "", token: str = ""
) -> list[str]:
    """etcd's flags for one member (no data dir): its client and peer URLs and the members it starts with
    (`initial_cluster`: name=peer-URL,...; default: itself alone). Plain logic, unit-tested."""
    client = f"http://{host}:{port}"
    peer = f"http://{host}:{peer_port}"
    flags = [
        "--name", name,
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial_cluster or f"{name}={peer}",
    ]
    if token:
        flags += ["--initial-cluster-token", token, "--initial-cluster-state", "new"]
    return flags


def etcd_initial_cluster(members: list[tuple[str, str, int]]) -> str:
    """etcd's --initial-cluster from (name, host, peer port) of every member."""
    names = [name for name, _, _ in members]
    if len(set(names)) != len(names):
        raise ValueError("the members of an etcd cluster need distinct names")
    return ",".join(f"{name}=http://{host}:{peer_port}" for name, host, peer_port in members)


class EtcdServer(ManagedProcess):
    """One etcd; with `initial_cluster` (etcd_initial_cluster) one member of a cluster, named `member`.
    A member restarted on its data dir rejoins its cluster (etcd ignores the initial flags then)."""

    def __init__(
        self, port: int, peer_port: int, data_dir: Path, *, host: str = "127.0.0.1", member: str = "unimodel",
        initial_cluster: str = "", ctl_endpoints: str = "", **kw,
    ) -> None:
        self.host, self.port, self.peer_port = host, port, peer_port
        self.member = member
        self.ctl_endpoints = ctl_endpoints  # etcdctl's --endpoints (default: this member alone)
        self.root_env: dict[str, str] = {}  # etcdctl's credentials once enable_auth ran
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        token = "unimodel" if initial_cluster else ""
        argv = [
            str(binaries.etcd()),
            *etcd_member_flags(member, host, port, peer_port, initial_cluster, token),
            "--data-dir", str(data_dir / "etcd"),
            "--log-level", "warn",
        ]
        super().__init__(kw.pop("name", "etcd"), argv, **kw)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start_and_wait(self, timeout: float = 30) -> None:
        self.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until it answers /health (a cluster's member: once the cluster has a leader)."""
        wait_until(lambda: http_ok(f"http://{self.host}:{self.port}/health"), timeout, f"etcd on port {self.port}", self)

    def etcdctl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """etcdctl against this server, as root once `enable_auth` ran (its password in the environment,
        never on a command line)."""
        ctl = [str(binaries.etcd().parent / "etcdctl"), "--endpoints", self.ctl_endpoints or self.endpoint, *args]
        env = {**os.environ, **self.root_env}
        return subprocess.run(ctl, input=stdin, capture_output=True, text=True, timeout=30, check=check, env=env)

    def auth_enabled(self) -> bool:
        done = self.etcdctl("auth", "status", check=False)
        # with auth on, an anonymous `auth status` is refused ("user name is empty")
        return done.returncode != 0 or "Status: true" in done.stdout

    def enable_auth(self, root_password: str, user: str, password: str, prefix: str, root_env: dict[str, str]) -> None:
        """Turn etcd's authentication on (once; a data dir that has it keeps it): users `root` and `user`,
        `user`'s role reading and writing only keys under `prefix`. Passwords go on etcdctl's stdin."""
        if not self.auth_enabled():
            for name, secret in (("root", root_password), (user, password)):
                added = self.etcdctl("user", "add", name, "--interactive=false", stdin=secret + "\n", check=False)
                if added.returncode != 0:  # left by an interrupted earlier run: set the password anew
                    self.etcdctl("user", "passwd", name, "--interactive=false", stdin=secret + "\n")
            self.etcdctl("user", "grant-role", "root", "root")
            self.etcdctl("role", "add", user, check=False)
            self.etcdctl("role", "grant-permission", user, "--prefix=true", "readwrite", prefix)
            self.etcdctl("user", "grant-role", user, user)
            self.etcdctl("auth", "enable")
            self.root_env = root_env
            return
        # on already (a data dir reused): the services' password as in its file now, should it have been made anew
        self.root_env = root_env
        self.etcdctl("user", "passwd", user, "--interactive=false", stdin=password + "\n", check=False)

    def revoke_leases(self) -> int:
        """Revoke every lease (and so delete the keys bound to it): in a data dir reused by a new cluster,
        the instance registrations of the last run's processes, which would otherwise show for one more
        TTL after a crash. Returns how many."""
        listed = self.etcdctl("lease", "list")
        leases = [w for w in listed.stdout.split() if all(c in "0123456789abcdef" for c in w) and len(w) >= 8]
        for lease in leases:
            self.etcdctl("lease", "revoke", lease, check=False)
        return len(leases)


class MilvusLiteServer(ManagedProcess):
    """Milvus Lite (package milvus-lite: Milvus's engine as one binary) serving its gRPC API on host:port,
    so the cache reaches it at http://host:port exactly as it reaches a standalone Milvus."""

    def __init__(self, port: int, data_dir: Path, *, host: str = "127.0.0.1", **kw) -> None:
        self.host, self.port = host, port
        data_dir = data_dir.resolve()  # the server runs in data_dir: a relative path would be taken from there
        data_dir.mkdir(parents=True, exist_ok=True)
        binary, lib = binaries.milvus_lite()
        env = dict(kw.pop("env", None) or os.environ)
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
        argv = [str(binary), str(data_dir / "milvus.db"), f"{host}:{port}", "ERROR"]
        super().__init__("milvus", argv, env=env, cwd=data_dir, **kw)

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start_and_wait(self, timeout: float = 60) -> None:
        self.start()
        wait_until(lambda: tcp_open(self.host, self.port), timeout, f"Milvus Lite on port {self.port}", self)
