"""How much else an event loop ran while a test awaited something: a task that counts its turns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def ticks_during(awaitable: Awaitable[T]) -> tuple[T, int]:
    """`awaitable`'s result, and how many turns another task got on the event loop meanwhile."""
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    try:
        return await awaitable, ticks
    finally:
        task.cancel()
