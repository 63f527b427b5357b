"""Big transfers paced to a byte rate, so the requests around them keep their latency.

Reading a 60 MB body from the socket and sending a 60 MB answer back are work for the gateway's event loop
(every network chunk is received, parsed and written to a file; every answer slice is written) and, on a small
host, for the CPUs the client and the kernel share with every service. Unpaced, that work comes as fast as the
client can push it, in a few hundred milliseconds, and the small requests served meanwhile wait behind it
(docs/benchmarks.md, "Big requests in flight"). A Pacer lets a transfer's first BURST bytes go as fast as they
come and the rest at most `rate` bytes per second: the gateway stops reading (TCP pushes back on the client) or
writing until the transfer is back on schedule. Only big requests take longer (60 MB at 32 MiB/s: under two
seconds each way); a body or answer of BURST bytes or less (an image, a batch of embeddings) never waits.
"""

from __future__ import annotations

import asyncio

BURST = 4 * 1024 * 1024
"""Bytes of a transfer that are never paced (the same size from which items travel by reference: blobs.py)."""


class Pacer:
    """Spreads one transfer over time: `await after(n)` once `n` more bytes have moved."""

    __slots__ = ("rate", "burst", "_start", "_moved")

    def __init__(self, rate: float, burst: int = BURST) -> None:
        self.rate = rate  # bytes per second; 0: not paced
        self.burst = burst
        self._start: float | None = None
        self._moved = 0

    async def after(self, n: int) -> None:
        """Wait until the transfer so far (`n` more bytes) has taken at least (its bytes - burst) / rate; when
        that is no wait (unpaced, within the burst, or on schedule), let what else is ready run first."""
        self._moved += n
        if self.rate <= 0 or self._moved <= self.burst:
            await asyncio.sleep(0)
            return
        now = asyncio.get_running_loop().time()
        if self._start is None:  # pacing starts at the end of the burst
            self._start = now
        due = self._start + (self._moved - self.burst) / self.rate
        await asyncio.sleep(max(due - now, 0.0))
