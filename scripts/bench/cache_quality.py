#!/usr/bin/env python3
"""Semantic cache quality on the evaluation sets, through the gateway's ModelCache API, at the default
thresholds (GPTCache's protocol: insert one side, query the other).

    .venv/bin/python scripts/bench/cache_quality.py [--data ../shared/data/cache] [--modes verify,plain]
        [--json docs/benchmarks/cache_quality.json]

A fresh local cluster (nats-server, etcd, Milvus Lite, the six services, all-MiniLM-L6-v2 on an
embedding-worker) starts on free ports. Then:
  * gptcache_mock_data.json: every `origin` inserted into one scope with its index as the answer, every
    `similar` queried; a hit is correct when the answer is the pair's own index. Precision = correct /
    hits, hit rate = hits / queries. (GPTCache published 94.4% precision at 45% hit rate.)
  * qqp_dev.jsonl, pairwise: each pair in its own scope, `a` inserted, `b` queried. A hit on a
    non-duplicate pair is a false hit; a hit on a duplicate pair a saving.
  * qqp_dev.jsonl, shared scope: every `a` in one scope, every `b` queried (a harder, more realistic mix:
    a non-duplicate `b` may also hit another pair's `a`). A hit counts as correct only on a duplicate pair
    and its own `a`.
Each mode runs on its own fresh cluster: `verify` is the default cache (recall thresholds, then the
verification stage), `plain` the cache with `--verify false` (the similarity thresholds alone decide).
Targets (issue 20): qqp (pairwise) >= 50% of duplicates served with <= 2.5% false hits; gptcache
precision >= 98% with hit rate >= 80%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

EMBEDDER = "all-minilm-l6-v2"
DEFAULT_MODES = "verify,plain"


def _shipped_threshold() -> float:
    from unimodel.cache.verifier import Verifier

    return Verifier.load().threshold


def start_cluster(tmp: Path, env: dict[str, str] | None = None):
    from helpers.modelrepo import prepared_repository
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    log = open(tmp / "cluster.log", "w")
    cfg = ClusterConfig(
        state_dir=tmp / "state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
        etcd_port=free_port(), log_level="warning", model_repository=prepared_repository(),
        prepare_models=False, load_models=EMBEDDER, extra_env=dict(env or {}),
    )
    cluster = LocalCluster(cfg, sink=log)
    cluster.start()
    url = f"http://127.0.0.1:{cfg.http_port}"
    wait_until(
        lambda: httpx.get(f"{url}/v1/models/{EMBEDDER}/status").json()["state"] == "READY", 120, "embedding model"
    )
    probe = json.dumps({"type": "query", "scope": {"model": "probe"}, "query": "is the cache up?"})
    wait_until(lambda: httpx.post(f"{url}/modelcache", json=probe, timeout=10).json()["errorCode"] == 0, 60, "the cache")
    return cluster, url


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    r = await client.post(f"{url}/modelcache", json=json.dumps(body), timeout=120)
    doc = r.json()
    if doc.get("errorCode") != 0:
        raise RuntimeError(f"{body['type']} failed: {doc}")
    return doc


def _insert(scope: str, pairs: list[tuple[str, str]]) -> dict:
    return {
        "type": "insert", "scope": {"model": scope},
        "chat_info": [{"query": [{"role": "user", "content": q}], "answer": a} for q, a in pairs],
    }


def _query(scope: str, text: str) -> dict:
    return {"type": "query", "scope": {"model": scope}, "query": [{"role": "user", "content": text}]}


async def _gather(coros, limit: int = 8):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def gptcache(url: str, data: list[dict]) -> dict:
    async with httpx.AsyncClient() as client:
        scope = "bench-gptcache"
        for start in range(0, len(data), 100):
            chunk = [(d["origin"], str(start + i)) for i, d in enumerate(data[start : start + 100])]
            await _post(client, url, _insert(scope, chunk))
        replies = await _gather(_post(client, url, _query(scope, d["similar"])) for d in data)
    correct = sum(1 for i, r in enumerate(replies) if r["cacheHit"] and r["answer"] == str(i))
    hits = sum(1 for r in replies if r["cacheHit"])
    return {
        "pairs": len(data), "hits": hits, "correct_hits": correct, "wrong_hits": hits - correct,
        "misses": len(data) - hits, "precision": round(correct / max(1, hits), 4), "hit_rate": round(hits / len(data), 4),
    }


async def qqp_pairwise(url: str, pairs: list[dict]) -> dict:
    async with httpx.AsyncClient() as client:
        await _gather(_post(client, url, _insert(f"bench-qqp-{i}", [(p["a"], str(i))])) for i, p in enumerate(pairs))
        replies = await _gather(_post(client, url, _query(f"bench-qqp-{i}", p["b"])) for i, p in enumerate(pairs))
    return _qqp_figures(pairs, replies)


async def qqp_shared(url: str, pairs: list[dict]) -> dict:
    async with httpx.AsyncClient() as client:
        scope = "bench-qqp-shared"
        for start in range(0, len(pairs), 100):
            chunk = [(p["a"], str(start + i)) for i, p in enumerate(pairs[start : start + 100])]
            await _post(client, url, _insert(scope, chunk))
        replies = await _gather(_post(client, url, _query(scope, p["b"])) for p in pairs)
    return _qqp_figures(pairs, replies)


def _qqp_figures(pairs: list[dict], replies: list[dict]) -> dict:
    dup = [p["duplicate"] for p in pairs]
    non = [i for i, d in enumerate(dup) if not d]
    yes = [i for i, d in enumerate(dup) if d]
    false_hits = sum(1 for i in non if replies[i]["cacheHit"])
    saved = sum(1 for i in yes if replies[i]["cacheHit"] and replies[i]["answer"] == str(i))
    other = sum(1 for i in yes if replies[i]["cacheHit"] and replies[i]["answer"] != str(i))
    return {
        "pairs": len(pairs), "duplicates": len(yes), "non_duplicates": len(non),
        "false_hits": false_hits, "false_hit_rate": round(false_hits / max(1, len(non)), 4),
        "duplicate_hits": saved, "duplicate_hit_rate": round(saved / max(1, len(yes)), 4),
        "duplicate_other_entry_hits": other,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cache"))
    p.add_argument("--modes", default=DEFAULT_MODES, help="verify (the default cache), plain (--verify false)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    data = Path(args.data)
    mock = json.loads((data / "gptcache_mock_data.json").read_text())
    qqp = [json.loads(line) for line in (data / "qqp_dev.jsonl").read_text().splitlines() if line.strip()]
    from unimodel.cache.settings import CacheSettings

    modes = {"verify": {}, "plain": {"UNIMODEL_VERIFY": "false"}}
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in modes]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(modes)}")
    defaults = CacheSettings()
    result: dict = {
        "benchmark": "cache_quality",
        "command": "python scripts/bench/cache_quality.py" + (f" --modes {args.modes}" if args.modes != DEFAULT_MODES else "")
        + (f" --json {args.json}" if args.json else ""),
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{platform.machine()}, {platform.python_version()}",
        "embedding_model": EMBEDDER,
        "settings": {
            "threshold_short": defaults.threshold_short, "threshold_long": defaults.threshold_long,
            "recall_threshold_short": defaults.recall_threshold_short, "recall_threshold_long": defaults.recall_threshold_long,
            "verify_threshold": defaults.verify_threshold or _shipped_threshold(), "top_k": defaults.top_k,
            "long_text_chars": defaults.long_text_chars, "ambiguity_margin": defaults.ambiguity_margin,
            "guard": defaults.guard, "index": defaults.milvus_index,
        },
    }
    for mode in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            cluster, url = start_cluster(Path(tmp), modes[mode])
            try:
                started = time.monotonic()
                g = asyncio.run(gptcache(url, mock))
                qp = asyncio.run(qqp_pairwise(url, qqp))
                qs = asyncio.run(qqp_shared(url, qqp))
                seconds = time.monotonic() - started
            except BaseException:
                print((Path(tmp) / "cluster.log").read_text()[-6000:], file=sys.stderr)
                raise
            finally:
                cluster.stop()
        result[mode] = {
            "gptcache_mock_data": g,
            "qqp_dev_pairwise": qp,
            "qqp_dev_shared_scope": qs,
            "targets_met": {
                "qqp_duplicates_served>=0.50": qp["duplicate_hit_rate"] >= 0.50, "qqp_false_hit_rate<=0.025": qp["false_hit_rate"] <= 0.025,
                "gptcache_precision>=0.98": g["precision"] >= 0.98, "gptcache_hit_rate>=0.80": g["hit_rate"] >= 0.80,
            },
            "seconds": round(seconds, 1),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
