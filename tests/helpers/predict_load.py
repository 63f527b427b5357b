"""A steady load of :predict requests on a `delay` model (helpers.support.delay_model, which echoes its
input as OUTPUT0), from client threads, each outcome recorded with its latency."""

from __future__ import annotations

import threading
import time

import httpx

Result = tuple[float, float, int, str]
"""(sent at: time.monotonic(), seconds, status, body if not the right answer). status: the HTTP status,
200 only for the right answer; -1 for a 200 with a wrong one; 0 when the connection failed."""


class PredictLoad:
    """`clients` threads sending predicts to `model` back to back, each value its own, until the block ends."""

    def __init__(self, url: str, model: str, clients: int = 6, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.model = model
        self.headers = headers or {}
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, n: int) -> None:
        i = 0
        with httpx.Client(timeout=40, headers=self.headers) as client:
            while not self._stop.is_set():
                value = float(n * 100000 + i)
                started = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v1/models/{self.model}:predict", json={"input": [value]})
                    if r.status_code != 200:
                        status, body = r.status_code, r.text[:200]
                    elif r.json()["output"] != {"OUTPUT0": [value]}:
                        status, body = -1, f"wrong answer: {r.text[:200]}"
                    else:
                        status, body = 200, ""
                except httpx.HTTPError as exc:
                    status, body = 0, type(exc).__name__
                self.results.append((started, time.monotonic() - started, status, body))  # list.append: thread-safe
                i += 1

    @property
    def ok(self) -> int:
        return sum(1 for r in self.results if r[2] == 200)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r[2] != 200]

    def __enter__(self) -> PredictLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
