"""Big bodies held in files (in /dev/shm, memory) while the gateway and its helper processes work on them.

A 60 MB body copied in one call (joining its chunks, pickling it to a helper process, joining an answer for the
socket) holds the event loop or the GIL for tens of milliseconds each time. Here a big body goes into a file
chunk by chunk as it arrives, its helper process (big_bodies.py) reads the file by name and writes what it
makes into another file, and the gateway maps that file (mmap: no copy) and sends it from the mapping.

Mapping 60 MB (and faulting its pages in), freeing it and writing a body held in memory to a file each cost
10-40 ms of system time, but none of them needs the GIL: they run in a small thread pool here (`_io`), not on
the event loop. What the event loop does is small writes (one network chunk at a time) and slicing views. A
mapped file stays linked while it is mapped (unmapping a linked file is cheap: its pages are not freed then)
and is unlinked in that pool once its last view is gone; a file nobody maps is unlinked there when closed.

Files are named `unimodel-<gateway pid>-<random>-<what>` and unlinked on every path: errors, client
disconnects, a helper that dies, cancellation. Files of a gateway that was killed are swept by the next one
(`sweep`). Plain files, not multiprocessing.shared_memory: no resource tracker to warn or unlink behind our
back, and a full /dev/shm is an ENOSPC error on write (a SharedMemory written through its mapping would die of
SIGBUS). /dev/shm is used when it has room for the body (Docker gives containers 64 MB by default), else the
temporary directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import secrets
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from unimodel.core import errors
from unimodel.core.bulk_threads import BulkPool, write_all

PREFIX = "unimodel-"
SHM = "/dev/shm"
WRITE_SLICE = 4 * 1024 * 1024
"""The most bytes one write() is given when a body in memory goes to a file."""
HEADROOM = 64 * 1024 * 1024
"""Room left free in /dev/shm beyond what a file needs, before the temporary directory is used instead."""

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")

_io = BulkPool("unimodel-spool")
_pending: set[concurrent.futures.Future[Any]] = set()


def _submit(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """`fn(*args)` in the spool's threads (file system work that lets go of the GIL), counted until done."""
    future = _io.submit(fn, *args)
    _pending.add(future)
    future.add_done_callback(_pending.discard)
    return future


def settle() -> None:
    """Wait until the spool's threads are done with what they were given (tests, and a gateway that stops)."""
    concurrent.futures.wait(list(_pending))


def spool_dir(need: int) -> str:
    """/dev/shm when it has room for `need` bytes (and HEADROOM more), else the temporary directory."""
    try:
        stat = os.statvfs(SHM)
    except OSError:
        return tempfile.gettempdir()
    return SHM if stat.f_bavail * stat.f_frsize >= need + HEADROOM else tempfile.gettempdir()


def new_path(what: str, need: int) -> str:
    """A fresh file name for `what` (input, item, answer, json): unique, with this process's id."""
    return os.path.join(spool_dir(need), f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{what}")


def discard(path: str) -> None:
    """Unlink `path`; gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def discard_soon(path: str) -> None:
    """discard(path) in the spool's threads (freeing 60 MB of /dev/shm takes 10-40 ms); here, from any thread."""
    try:
        _submit(discard, path)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        discard(path)


def no_room(path: str, exc: OSError) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(
        f"no room to hold a big body in {os.path.dirname(path)} ({exc.strerror}); try again later", retry_after_s=1.0
    )


def write_file(path: str, data: Buffer) -> int:
    """Create `path` (it must not exist) holding `data` (in a helper process: all of it at once); its size.
    On failure nothing is left behind; a full disk is ResourceExhausted."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise no_room(path, exc) from None
    try:
        return write_all(fd, data)
    except OSError as exc:
        discard(path)
        raise no_room(path, exc) from None
    except BaseException:
        discard(path)
        raise
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    """The whole of `path` (in a helper process)."""
    return Path(path).read_bytes()


def _map(path: str) -> memoryview | bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # mmap refuses empty files
                discard(path)
                return b""
            # MAP_POPULATE: the pages are faulted in here, in this thread, not later while the loop sends them
            mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except BaseException:
        discard(path)
        raise
    weakref.finalize(mapped, discard_soon, path)
    return memoryview(mapped)


async def map_file(path: str) -> memoryview | bytes:
    """`path` mapped read-only (no copy; mapped in the spool's threads). The file is unlinked once the last
    view of it is gone (or here, when this fails or is cancelled)."""
    future = _submit(_map, path)
    try:
        return await asyncio.wrap_future(future)
    except BaseException:
        future.add_done_callback(lambda f: discard_soon(path) if f.cancelled() else None)  # else: _map's
        raise


def sweep(directories: tuple[str, ...] = (SHM, tempfile.gettempdir()), *, own: bool = False) -> int:
    """Unlink the files of gateways that are gone (a gateway killed mid-request leaves its files), and with
    `own`, this process's too (at stop); how many."""
    removed = 0
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not name.startswith(PREFIX):
                continue
            pid_text = name[len(PREFIX):].split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if (pid == os.getpid() and not own) or (pid != os.getpid() and _alive(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpooledBody:
    """A request body (or answer) in a file: written chunk by chunk as it arrives (`write`), then `finish`ed;
    `close` unlinks it (idempotent; every owner calls it in a finally)."""

    __slots__ = ("path", "size", "_fd", "_closed")

    def __init__(self, what: str, need: int) -> None:
        self.path = new_path(what, need)
        self.size = 0
        self._closed = False
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise no_room(self.path, exc) from None

    def __len__(self) -> int:
        return self.size

    def write(self, data: Buffer) -> None:
        """Append `data` (one network chunk, or a slice of at most WRITE_SLICE bytes)."""
        if self._fd is None:
            raise ValueError("the body is finished")
        try:
            self.size += write_all(self._fd, data)
        except OSError as exc:
            self.close()
            raise no_room(self.path, exc) from None

    def finish(self) -> SpooledBody:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        return self

    def close(self) -> None:
        """Unlink the file (in the spool's threads: it may be big)."""
        self.finish()
        if not self._closed:
            self._closed = True
            discard_soon(self.path)

    @classmethod
    async def of(cls, data: Buffer, what: str) -> SpooledBody:
        """`data` (in memory, left unchanged meanwhile) in a file, written in the spool's threads."""
        body = cls(what, len(data))
        try:
            future = _submit(body._write_all, data)
        except BaseException:
            body.close()
            raise
        try:
            await asyncio.wrap_future(future)
        except BaseException:  # closed once the thread has let go of the file (never under its feet)
            future.add_done_callback(lambda _: body.close())
            raise
        return body.finish()

    def _write_all(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_SLICE):
            self.write(view[start : start + WRITE_SLICE])
