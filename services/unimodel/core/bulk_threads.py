"""Threads for bulk copies (writing, mapping and freeing big payloads), at a lower CPU priority.

Copying 60 MB into a file, faulting in its mapping or freeing it runs in system calls that let go of the GIL,
so a thread keeps that work off the event loop; but on a small host it still takes a CPU from the processes
that serve small requests. These threads run at BULK_NICENESS (Linux lets a thread lower its own priority), as
the gateway's helper processes do: the bulk work waits a little, the small requests do not.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
