"""Service.run() must stop even when the start task swallows a cancel (Python 3.11 wait_for race)."""

from __future__ import annotations

import asyncio
import os
import signal

from unimodel.core.lifecycle import Service
from unimodel.core.settings import CommonSettings


class _StubbornStart(Service):
    """A start() that, like nats-py's connect retry loop under 3.11's wait_for, ignores the first cancel."""

    kind = "stubborn"

    def __init__(self) -> None:
        super().__init__(CommonSettings(instance_id="stubborn-1"))
        self.cancels_seen = 0

    async def start(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels_seen += 1
                if self.cancels_seen >= 2:
                    raise


def test_run_stops_when_start_swallows_the_first_cancel() -> None:
    async def scenario() -> int:
        service = _StubbornStart()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(service.run(), timeout=10)
        return service.cancels_seen

    assert asyncio.run(scenario()) == 2
