"""Helpers for the tests that run `unimodel up` as a user does: its status as JSON, and Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.process_tree import alive, descendants
from unimodel.local.procs import wait_until


def status_json(etcd: int, state_dir: Path) -> dict[str, Any]:
    """`unimodel status --json` against the cluster's etcd, with the credentials in its state directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "unimodel.cli", "status", "--json", "--etcd-endpoints", f"127.0.0.1:{etcd}",
         "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=30,
    )
    return json.loads(proc.stdout)


def ctrl_c(up: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGINT as Ctrl-C sends it: `up` exits 0 and none of its processes is left."""
    children = descendants(up.pid)
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout_s) == 0
    wait_until(lambda: not any(alive(p) for p in children), 15, "no process left behind")


def kill_if_running(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        up.kill()
        up.wait(10)
