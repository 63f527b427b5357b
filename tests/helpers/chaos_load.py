"""Load for the chaos suite (tests/chaos): async clients that record every request's outcome.

Each `Load` runs `concurrency` client loops on an event loop of its own thread, so the test thread stays
free to inject faults. Every request ends in exactly one outcome:

- ok: the right answer (tensor echoed, embedding of the right size, the whole greedy text with one [DONE])
- error: a clear error: an HTTP error status with a JSON body naming the problem, an SSE error event, or
  no gateway accepting the connection (the client knows at once, nothing was sent)
- dropped: the connection broke after the request was sent (its gateway died): the client knows at once
- unclear: an answer that is wrong or says nothing: a 5xx without a JSON error, a wrong tensor, a stream
  that ends without [DONE] or an error event, a stream whose text differs from the greedy reference
- lost: no answer by the request's deadline (the gateway's deadline plus a grace)

Gateways are called in client-side round robin; a connection that is refused or times out before anything
was sent goes to the next gateway (what a client or load balancer with two replicas does).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

OK, ERROR, DROPPED, UNCLEAR, LOST = "ok", "error", "dropped", "unclear", "lost"
OUTCOMES = (OK, ERROR, DROPPED, UNCLEAR, LOST)


@dataclass(frozen=True)
class Result:
    started: float  # time.monotonic() when sent
    seconds: float
    outcome: str
    detail: str  # why, when not ok (status and message, exception name)

    @property
    def ended(self) -> float:
        return self.started + self.seconds


class NoGateway(Exception):
    """No gateway accepted the connection."""


Call = Callable[[httpx.AsyncClient, str, int], Awaitable[tuple[str, str]]]
"""One request: (client, gateway base URL, sequence number) -> (outcome, detail)."""


class Load:
    """`concurrency` loops sending `call` back to back until stopped; `deadline_s` bounds each request."""

    def __init__(self, name: str, gateways: list[str], call: Call, *, concurrency: int, deadline_s: float) -> None:
        self.name, self.gateways, self.call = name, gateways, call
        self.concurrency, self.deadline_s = concurrency, deadline_s
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"load {name}", daemon=True)
        self._next = 0

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending; wait for the requests in flight (at most their deadline)."""
        self._stop.set()
        self._thread.join(self.deadline_s + 30)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.deadline_s, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(self._loop(client, n) for n in range(self.concurrency)))

    async def _loop(self, client: httpx.AsyncClient, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            seq = n * 1_000_000 + i
            started = time.monotonic()
            outcome, detail = await self._one(client, seq)
            self.results.append(Result(started, time.monotonic() - started, outcome, detail))
            i += 1
            if outcome in (ERROR, DROPPED) and detail.startswith("no gateway"):
                await asyncio.sleep(0.05)  # every replica refused: do not spin

    async def _one(self, client: httpx.AsyncClient, seq: int) -> tuple[str, str]:
        try:
            return await asyncio.wait_for(self._round_robin(client, seq), self.deadline_s)
        except (TimeoutError, httpx.TimeoutException) as exc:
            return LOST, f"no answer within {self.deadline_s:.0f}s ({type(exc).__name__})"
        except NoGateway as exc:
            return ERROR, f"no gateway: {exc}"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            return DROPPED, f"connection broke: {type(exc).__name__}"
        except httpx.HTTPError as exc:
            return UNCLEAR, f"{type(exc).__name__}: {exc}"[:200]

    async def _round_robin(self, client: httpx.AsyncClient, seq: int) -> tuple[str, str]:
        first = self._next
        self._next += 1
        errors = []
        for k in range(len(self.gateways)):
            url = self.gateways[(first + k) % len(self.gateways)]
            try:
                return await self.call(client, url, seq)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent: the next replica
                errors.append(type(exc).__name__)
        raise NoGateway(", ".join(errors))


# classification ---------------------------------------------------------------------------------------
def error_message(r: httpx.Response) -> str:
    """The message of a JSON error body (OpenAI/KServe/unified `error`, ModelCache `errorDesc`); '' if none."""
    try:
        doc = r.json()
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    err = doc.get("error")
    if isinstance(err, dict):
        err = err.get("message")
    if isinstance(err, str) and err.strip():
        return err
    desc = doc.get("errorDesc")
    return desc if isinstance(desc, str) and desc.strip() else ""


def http_failure(r: httpx.Response) -> tuple[str, str]:
    """An HTTP error status: clear with a JSON message, unclear without one."""
    message = error_message(r)
    if message:
        return ERROR, f"{r.status_code} {message}"[:200]
    return UNCLEAR, f"{r.status_code} without a JSON error: {r.text[:120]!r}"


# the request kinds ------------------------------------------------------------------------------------
def tensor_call(model: str) -> Call:
    """KServe v2 JSON /infer of one FP32 value on an echoing model; the answer must be the same value."""

    async def call(client: httpx.AsyncClient, url: str, seq: int) -> tuple[str, str]:
        value = float(seq)
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [value]}]}
        r = await client.post(f"{url}/v2/models/{model}/infer", json=body)
        if r.status_code != 200:
            return http_failure(r)
        try:
            data = r.json()["outputs"][0]["data"]
        except (ValueError, KeyError, IndexError, TypeError):
            return UNCLEAR, f"200 with an unreadable body: {r.text[:120]!r}"
        return (OK, "") if data == [value] else (UNCLEAR, f"200 with a wrong tensor: {data!r} for {value}")

    return call


def embedding_call(model: str, dim: int) -> Call:
    async def call(client: httpx.AsyncClient, url: str, seq: int) -> tuple[str, str]:
        r = await client.post(f"{url}/v1/embeddings", json={"model": model, "input": f"sentence number {seq}", "encoding_format": "float"})
        if r.status_code != 200:
            return http_failure(r)
        try:
            vector = r.json()["data"][0]["embedding"]
        except (ValueError, KeyError, IndexError, TypeError):
            return UNCLEAR, f"200 with an unreadable body: {r.text[:120]!r}"
        return (OK, "") if len(vector) == dim else (UNCLEAR, f"200 with {len(vector)} values, not {dim}")

    return call


def cache_call(scope_model: str) -> Call:
    """A ModelCache query (as its clients send it: a JSON string); any answer with errorCode 0 is ok."""

    async def call(client: httpx.AsyncClient, url: str, seq: int) -> tuple[str, str]:
        doc = {"type": "query", "scope": {"model": scope_model}, "query": [{"role": "user", "content": f"question {seq % 50}"}]}
        r = await client.post(f"{url}/modelcache", json=json.dumps(doc))
        if r.status_code != 200:
            return http_failure(r)
        try:
            code = r.json()["errorCode"]
        except (ValueError, KeyError, TypeError):
            return UNCLEAR, f"200 with an unreadable body: {r.text[:120]!r}"
        return (OK, "") if code == 0 else (UNCLEAR, f"200 with errorCode {code}")

    return call


@dataclass(frozen=True)
class Greedy:
    """A greedy chat request and the answer an uninterrupted run gives (text, completion tokens)."""

    body: dict
    text: str
    completion_tokens: int


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict, on_worker: Callable[[str], None] | None = None
) -> tuple[str, str, str, int]:
    """POST a streamed chat; returns (status: 'done' | 'error' | 'cut' | 'http <code>', text or error, detail,
    completion tokens in usage). `on_worker` is told the worker that starts the answer (x-unimodel-worker)."""
    text: list[str] = []
    tokens = -1
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-unimodel-cache": "off"}) as r:
        if on_worker is not None and r.status_code == 200:
            on_worker(r.headers.get("x-unimodel-worker", ""))
        if r.status_code != 200:
            await r.aread()
            outcome, detail = http_failure(r)
            return f"http {outcome}", "", detail, -1
        done = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done += 1
                continue
            doc = json.loads(data)
            if "error" in doc:
                message = doc["error"].get("message", "") if isinstance(doc["error"], dict) else str(doc["error"])
                return "error", "".join(text), f"SSE error event: {message}"[:200], tokens
            if doc.get("usage"):
                tokens = int(doc["usage"].get("completion_tokens", -1))
            for choice in doc.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
        if done != 1:
            return "cut", "".join(text), f"stream ended with {done} [DONE] and no error event", tokens
        return "done", "".join(text), "", tokens


def stream_call(greedy: Greedy, active: dict[int, str] | None = None) -> Call:
    """A streamed greedy chat: ok when the text is exactly the reference's, one [DONE], usage of the whole.
    `active` (when given) maps each stream in flight to the worker that started it."""

    async def call(client: httpx.AsyncClient, url: str, seq: int) -> tuple[str, str]:
        def started_on(worker: str) -> None:
            if active is not None:
                active[seq] = worker

        try:
            status, text, detail, tokens = await read_stream(client, url, greedy.body, started_on)
        finally:
            if active is not None:
                active.pop(seq, None)
        if status.startswith("http "):
            return status.removeprefix("http "), detail
        if status == "error":
            return ERROR, detail
        if status == "cut":
            return UNCLEAR, detail
        if text != greedy.text:
            cut = next((i for i, (a, b) in enumerate(zip(text, greedy.text, strict=False)) if a != b), min(len(text), len(greedy.text)))
            return UNCLEAR, f"text differs from the greedy reference at char {cut} ({len(text)} vs {len(greedy.text)} chars)"
        if tokens != greedy.completion_tokens:
            return UNCLEAR, f"usage says {tokens} completion tokens, the answer has {greedy.completion_tokens}"
        return OK, ""

    return call


async def _reference(url: str, body: dict) -> Greedy:
    async with httpx.AsyncClient(timeout=120) as client:
        status, text, detail, tokens = await read_stream(client, url, body)
    if status != "done" or not text:
        raise RuntimeError(f"the greedy reference stream failed: {status} {detail}")
    return Greedy(body, text, tokens)


def greedy_reference(url: str, body: dict) -> Greedy:
    return asyncio.run(_reference(url, body))


# statistics -------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def summarize(results: list[Result], fault_at: float, recovering_at: float, recovered_at: float) -> dict:
    """Counts of the requests in flight at the fault or sent after it; of those that did not succeed, how
    many were sent before the recovery began (the fault itself) and how many after (while what the fault
    stopped was started again); p99 of those sent while the fault lasted (fault .. recovered); baseline p99
    of those that ended before the fault."""
    during = [r for r in results if r.ended >= fault_at]
    not_ok = [r for r in during if r.outcome != OK]
    before = [r for r in results if r.ended < fault_at]
    window = [r for r in during if r.started <= recovered_at]
    counts = {o: sum(r.outcome == o for r in during) for o in OUTCOMES}
    samples: dict[str, list[str]] = {}
    for r in during:
        if r.outcome != OK:
            details = samples.setdefault(r.outcome, [])
            short = f"{r.started - fault_at:+.1f}s {r.detail}"[:160]
            if len(details) < 3 and not any(d.split(" ", 1)[1] == short.split(" ", 1)[1] for d in details):
                details.append(short)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "sent": len(during),
        "succeeded": counts[OK],
        "failed_clear": counts[ERROR],
        "dropped": counts[DROPPED],
        "failed_unclear": counts[UNCLEAR],
        "lost": counts[LOST],
        "not_ok_sent_before_recovery": sum(r.started < recovering_at for r in not_ok),
        "not_ok_sent_during_recovery": sum(r.started >= recovering_at for r in not_ok),
        "p99_ms_during_fault": ms(percentile([r.seconds for r in window if r.outcome != LOST], 99)),
        "max_ms": ms(max((r.seconds for r in during), default=None)),
        "baseline_p99_ms": ms(percentile([r.seconds for r in before if r.outcome == OK], 99)),
        "examples": {k: samples[k] for k in sorted(samples)},
    }



# perf_analyzer --------------------------------------------------------------------------------------
PEERS = Path(__file__).resolve().parents[2] / ".venv-peers"
PERF_ANALYZER = PEERS / "bin" / "perf_analyzer"


def perf_analyzer_missing() -> str:
    """'' when Triton's perf_analyzer (scripts/bench/setup_peers.sh) can run here, else why not."""
    if not PERF_ANALYZER.exists() or next(PEERS.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"), None) is None:
        return "perf_analyzer is not installed (scripts/bench/setup_peers.sh)"
    return ""


class PerfAnalyzerLoad:
    """Triton's perf_analyzer, unmodified, over KServe gRPC against one gateway (it knows one URL) at
    concurrency 4, in time windows of `window_ms` until `windows` are measured. Its profile export holds
    every measured request with its input, output and timestamps: each becomes a Result (ok when the output
    is the input). perf_analyzer stops at the first failed request: that is one `error` Result with its
    message. Requests of its warm-up, before the first window, are not in the export."""

    def __init__(self, name: str, grpc_address: str, model: str, folder: Path, *, window_ms: int = 4000, windows: int = 3) -> None:
        self.name, self.folder = name, folder
        cudart = next(PEERS.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
        self.env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self.export = folder / f"{name}.json"
        self.argv = [
            str(PERF_ANALYZER), "-m", model, "-u", grpc_address, "-i", "grpc", "--shape", "INPUT0:1",
            "--concurrency-range", "4", "--measurement-mode", "time_windows", "-p", str(window_ms),
            "--stability-percentage", "1000", "--max-trials", str(windows), "--profile-export-file", str(self.export),
        ]
        self.results: list[Result] = []
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0.0

    def __enter__(self) -> PerfAnalyzerLoad:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.export.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Wait for perf_analyzer to finish its windows; read its export."""
        assert self.proc is not None
        try:
            output, _ = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        offset_ns = time.time_ns() - time.monotonic_ns()  # the export's timestamps are wall-clock ns
        try:
            experiments = json.loads(self.export.read_text())["experiments"]
        except (OSError, ValueError, KeyError):
            experiments = []
        for experiment in experiments:
            for request in experiment["requests"]:
                sent = (request["timestamp"] - offset_ns) / 1e9
                answers = request.get("response_timestamps") or []
                if not answers:
                    self.results.append(Result(sent, 0.0, UNCLEAR, "no response in the export"))
                    continue
                same = request.get("response_outputs", [{}])[0].get("OUTPUT0") == request.get("request_inputs", {}).get("INPUT0")
                self.results.append(Result(sent, (answers[-1] - request["timestamp"]) / 1e9, OK if same else UNCLEAR, "" if same else "wrong output"))
        if self.proc.returncode != 0:
            error = next((line for line in output.splitlines() if "error" in line.lower()), output.strip()[-200:])
            self.results.append(Result(time.monotonic() - 0.001, 0.0, ERROR, f"perf_analyzer exited {self.proc.returncode}: {error}"[:200]))
