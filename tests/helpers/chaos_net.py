"""A network namespace joined to the host by a veth pair, for the chaos suite's network faults.

`Netns.create()` makes namespace `umchaos<pid>`, veth `umcH<pid>` (host) / `umcN<pid>` (namespace) and the
/30 10.213.<n>.0 on them (host .1, namespace .2); `delete()` removes all of it (idempotent). A process
started inside (`prefix()` + argv) reaches the host's servers at `host_address`. Faults:

- `partition()` / `heal()`: `ip link set <host veth> down` / `up`: nothing crosses the veth. The host keeps
  its address on a link that is down (IPv4 keeps local routes), so the host's own clients of a server bound
  there are not affected.
- `delay(ms)` / `clear()`: `tc qdisc ... netem delay` on both ends of the veth (needs the sch_netem kernel
  module; `netem_missing()` says why not when it is absent).

Only the namespace and the veth made here are touched; creating them needs CAP_NET_ADMIN (root).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


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
        self.qdiscs: set[str] = set()  # "host" / "ns" ends with a netem qdisc

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

    def _tc(self, end: str, *args: str) -> subprocess.CompletedProcess[str]:
        dev = self.host_if if end == "host" else self.ns_if
        prefix = [] if end == "host" else ["ip", "netns", "exec", self.name]
        return subprocess.run([*prefix, "tc", "qdisc", *args[:1], "dev", dev, *args[1:]], capture_output=True, text=True, timeout=10)

    def netem_missing(self) -> str:
        """'' when netem qdiscs can be added here, else why not (tried on the host veth, then removed)."""
        try:
            done = self._tc("host", "add", "root", "netem", "delay", "1ms")
        except OSError as exc:  # no tc binary
            return f"tc is not available: {exc}"
        if done.returncode != 0:
            return f"tc netem is not available: {done.stderr.strip() or done.stdout.strip()}"
        self._tc("host", "del", "root")
        return ""

    def delay(self, ms: int) -> None:
        """netem delay of `ms` on both ends: each packet waits `ms` each way."""
        for end in ("host", "ns"):
            done = self._tc(end, "add", "root", "netem", "delay", f"{ms}ms")
            if done.returncode != 0:
                raise RuntimeError(f"tc netem on the {end} end: {done.stderr.strip()}")
            self.qdiscs.add(end)

    def clear(self) -> None:
        for end in sorted(self.qdiscs):
            self._tc(end, "del", "root")
        self.qdiscs.clear()

    def delete(self) -> None:
        """Remove the qdiscs, the veth pair (deleting one end deletes both) and the namespace."""
        self.clear()
        _ip("link", "del", self.host_if, check=False)
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False

    def exists(self) -> bool:
        return self.name in _ip("netns", "list", check=False).stdout.split()
