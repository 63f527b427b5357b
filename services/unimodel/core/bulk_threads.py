"""Threads for bulk copies (writing, mapping and freeing big payloads), at a lower CPU priority, and the write
loop those copies use.

Copying 60 MB into a file, faulting in its mapping or freeing it runs in system calls that let go of the GIL,
so a thread keeps that work off the event loop; but on a small host it still takes a CPU from the processes
that serve small requests. These threads run at BULK_NICENESS (Linux lets a thread lower its own priority), as
the gateway's helper processes do: the bulk work waits a little, the small requests do not.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

BULK_NICENESS = 10


def _lower_own_priority() -> None:
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + BULK_NICENESS, 19))
    except (OSError, AttributeError):  # not allowed here, or not Linux: the thread runs at the process's priority
        pass


def bulk_executor(name: str, workers: int = 2) -> ThreadPoolExecutor:
    """A thread pool whose threads run BULK_NICENESS lower than the process."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=_lower_own_priority)


class BulkPool:
    """A bulk_executor made on first use, from any thread (gateway/spool.py's and core/blobs.py's)."""

    def __init__(self, name: str, workers: int = 2) -> None:
        self.name, self.workers = name, workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()  # a finalizer may submit while this thread holds it

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """`fn(*args)` in the pool; RuntimeError once the interpreter is shutting down (no new threads)."""
        with self._lock:
            if self._pool is None:
                self._pool = bulk_executor(self.name, self.workers)
            return self._pool.submit(fn, *args)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write all of `data` to `fd` (os.write may take less than it is given); how many bytes."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:])
    return done
