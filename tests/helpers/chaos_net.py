"""A network namespace joined to the host by a veth pair, for the chaos suite's network faults.

`Netns.create()` makes namespace `umchaos<pid>`, veth `umcH<pid>` (host) / `umcN<pid>` (namespace) and the
/30 10.213.<n>.0 on them (host .1, namespace .2); `delete()` removes all of it (idempotent). A process
started inside (`prefix()` + argv) reaches the host's servers through `start_proxy()`: a delaying TCP proxy
(helpers.delay_proxy, a process in the host's namespace) listening on `host_address`, one port per server.
Faults:

- `partition()` / `heal()`: `ip link set <host veth> down` / `up`: nothing crosses the veth, so the process
  inside loses every connection to the proxy (the proxy's own connections to the servers, on loopback, stay).
- `delay(ms)` / `clear()`: the proxy delays every chunk `ms` each way (user-space, as Toxiproxy's latency
  toxic; this replaces `tc netem`, which needs the sch_netem kernel module that some kernels lack). TCP
  handshakes and acknowledgements are not delayed, only the data and the ends of stream.

Only the namespace, the veth and the proxy made here are touched; creating them needs CAP_NET_ADMIN (root).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TextIO

from helpers.delay_proxy import DelayProxy


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


PREFIX = "umchaos"


def _remove_stale() -> None:
    for name in _ip("netns", "list", check=False).stdout.split():
        pid = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)  # its veth pair goes with it


class Netns:
    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}"
        self.host_if, self.ns_if = f"umcH{pid}"[:15], f"umcN{pid}"[:15]
        net = 64 + pid % 128
        self.host_address, self.ns_address = f"10.213.{net}.1", f"10.213.{net}.2"
        self.created = False
        self.proxy: DelayProxy | None = None

    @classmethod
    def create(cls) -> tuple[Netns | None, str]:
        """(the namespace, '') or (None, why it could not be made). First deletes the namespaces an earlier
        run of this suite left behind when it was killed (`umchaos<pid>` of a pid that is gone)."""
        ns = cls()
        try:
            _remove_stale()
            ns._create()
        except (OSError, subprocess.SubprocessError) as exc:
            ns.delete()
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else str(exc)
            return None, f"cannot create a network namespace here: {detail}"
        return ns, ""

    def _create(self) -> None:
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_address}/30", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def partition(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def start_proxy(self, upstreams: dict[str, str], sink: TextIO | None = None) -> dict[str, str]:
        """Start the delaying proxy on `host_address`, a free port per upstream (name -> "host:port", reached
        from the host's namespace); returns name -> the "host:port" a process inside connects to instead."""
        self.stop_proxy()
        self.proxy = DelayProxy({name: (f"{self.host_address}:0", upstream) for name, upstream in upstreams.items()}, sink=sink)
        self.proxy.start()
        return dict(self.proxy.addresses)

    def stop_proxy(self) -> None:
        """Stop the proxy (idempotent): every connection through it is closed."""
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    def delay(self, ms: int) -> None:
        """Each chunk through the proxy waits `ms`, each way (chunks already waiting keep their time)."""
        if self.proxy is None:
            raise RuntimeError("no proxy to delay: start_proxy() first")
        self.proxy.set_delay(ms)

    def clear(self) -> None:
        """No delay any more (nothing to do without a running proxy)."""
        if self.proxy is not None and self.proxy.alive():
            self.proxy.set_delay(0)

    def peers(self) -> set[str]:
        """The remote "host:port" of every established TCP connection inside the namespace, but for loopback
        (an IPv4-mapped IPv6 peer written as IPv4)."""
        done = subprocess.run([*self.prefix(), "ss", "-Htn", "state", "established"], capture_output=True, text=True, timeout=10, check=True)
        peers = set()
        for line in done.stdout.splitlines():
            if line.strip():
                host, _, port = line.split()[-1].rpartition(":")
                host = host.strip("[]").removeprefix("::ffff:")
                if not host.startswith("127.") and host != "::1":
                    peers.add(f"{host}:{port}")
        return peers

    def delete(self) -> None:
        """Stop the proxy; remove the veth pair (deleting one end deletes both) and the namespace."""
        self.stop_proxy()
        _ip("link", "del", self.host_if, check=False)
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False

    def exists(self) -> bool:
        return self.name in _ip("netns", "list", check=False).stdout.split()
