"""gateway/pacing.py: a big transfer past its burst goes at most `rate` bytes per second; small ones never wait."""

from __future__ import annotations

import time
from typing import Any

import pytest

from helpers.loop_ticks import ticks_during
from unimodel.gateway.http_context import read_body_spooled
from unimodel.gateway.pacing import BURST, Pacer
from unimodel.gateway.spool import SpooledBody

pytestmark = pytest.mark.asyncio
MiB = 1024 * 1024


async def move(pacer: Pacer, total: int, step: int) -> float:
    started = time.monotonic()
    for _ in range(total // step):
        await pacer.after(step)
    return time.monotonic() - started


async def test_within_the_burst_or_unpaced_nothing_waits() -> None:
    assert await move(Pacer(1 * MiB), BURST, 256 * 1024) < 0.05  # 4 MiB at 1 MiB/s would take 4 s
    assert await move(Pacer(0), 64 * MiB, 256 * 1024) < 0.2


async def test_past_the_burst_a_transfer_keeps_to_its_rate() -> None:
    rate = 16 * MiB
    took = await move(Pacer(rate, burst=1 * MiB), 5 * MiB, 256 * 1024)  # 4 MiB past the burst: 0.25 s
    assert took >= 4 * MiB / rate - 0.02


async def test_others_run_between_the_steps_of_a_paced_transfer() -> None:
    _, ticks = await ticks_during(move(Pacer(0), 1 * MiB, 64 * 1024))  # unpaced still yields at each step
    assert ticks >= 16


async def test_a_spooled_body_is_read_at_the_rate() -> None:
    chunks = [b"x" * (256 * 1024)] * 24  # 6 MiB: 2 MiB past the burst at 8 MiB/s, at least 0.25 s
    it = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)])

    async def receive() -> dict[str, Any]:
        return next(it)

    started = time.monotonic()
    body = await read_body_spooled(receive, 64 * 1024, 6 * MiB, rate=8 * MiB)
    took = time.monotonic() - started
    assert isinstance(body, SpooledBody) and len(body) == 6 * MiB
    body.close()
    assert took >= 2 * MiB / (8 * MiB) - 0.02
