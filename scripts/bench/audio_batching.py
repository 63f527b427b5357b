#!/usr/bin/env python3
"""Speech to text, batched vs unbatched: 8 concurrent clips of about 5 seconds through the gateway's OpenAI
`/v1/audio/transcriptions`, on one local cluster, interleaved.

    .venv/bin/python scripts/bench/audio_batching.py [--rounds 5] [--clients 8] [--json docs/benchmarks/audio_batching.json]

One cluster (nats-server, etcd, the six services, ONE gpu-worker) serves whisper-base (CTranslate2, the engine's
default compute type for the CPU, every CPU of the machine as its threads) three times over, from the same folder:
  - `whisper-base`: the demo config: batches of up to 16 requests, short clips packed into shared 30 s windows
    (pack_seconds 10);
  - `whisper-base-nopack`: batched the same way, each clip in its own window (pack_seconds 0);
  - `whisper-base-unbatched`: max_batch_size 1, one request per engine call (what a server without a batcher
    does with concurrent requests: one after another).
Each round sends the 8 English espeak-ng clips of tests/data/speech (4.0-5.3 s, 22,050 Hz WAV) at once from 8
clients (httpx, multipart, language en) to each variant in turn, the order rotating every round, after one
warm-up round each. Reported per variant: clips/s (clips / wall time of the round, pooled over rounds), the
real-time factor (wall seconds per second of audio: under 1 is faster than real time), request latency p50 /
max, the word error rate against the sentences, and the ratios to unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

MODEL = "whisper-base"
VARIANTS = {
    MODEL: None,
    f"{MODEL}-nopack": {"options": {"max_audio_seconds": "600", "pack_seconds": "0", "beam_size": "1"}},
    f"{MODEL}-unbatched": {"max_batch_size": 1},
}


async def one_round(url: str, model: str, clips: list[tuple[str, bytes, str]]) -> tuple[float, list[float], int, int]:
    """(wall seconds, request latencies, word errors, reference words) of all clips sent at once."""
    from helpers.speech import word_errors

    async def one(http: httpx.AsyncClient, name: str, data: bytes, text: str) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        r = await http.post(f"{url}/v1/audio/transcriptions", data={"model": model, "language": "en"}, files={"file": (name, data, "audio/wav")})
        r.raise_for_status()
        return time.perf_counter() - t0, *word_errors(text, r.json()["text"])

    async with httpx.AsyncClient(timeout=300) as http:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(http, *clip) for clip in clips))
        wall = time.perf_counter() - t0
    return wall, [o[0] for o in out], sum(o[1] for o in out), sum(o[2] for o in out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8, help="clips sent at once (the first N English clips, repeated if needed)")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "audio_batching.json")
    args = p.parse_args()

    import soundfile

    from helpers.modelrepo import prepared_repository
    from helpers.speech import ENGLISH, SENTENCES, SPEECH
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    names = [ENGLISH[i % len(ENGLISH)] for i in range(args.clients)]
    clips = [(n, (SPEECH / n).read_bytes(), SENTENCES[n]["text"]) for n in names]
    audio_seconds = sum(soundfile.info(SPEECH / n).duration for n in names)
    repository = prepared_repository()
    stats: dict[str, dict[str, list[float]]] = {v: {"wall": [], "latency": [], "errors": [], "words": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ClusterConfig(
            state_dir=Path(tmp) / "state",
            http_port=free_port(),
            grpc_port=free_port(),
            nats_port=free_port(),
            etcd_port=free_port(),
            log_level="warning",
            model_repository=repository,
            prepare_models=False,
            load_models=MODEL,
            workers=1,
        )
        with open(Path(tmp) / "cluster.log", "w") as log:
            cluster = LocalCluster(cfg, sink=log)
            try:
                cluster.start()
                url = f"http://127.0.0.1:{cfg.http_port}"
                for name, override in VARIANTS.items():
                    if override is not None:
                        r = httpx.post(f"{url}/v1/models", json={"name": name, "path": MODEL, "config": override}, timeout=10)
                        r.raise_for_status()

                def ready() -> bool:
                    return all(httpx.get(f"{url}/v1/models/{v}/status", timeout=5).json().get("state") == "READY" for v in VARIANTS)

                wait_until(ready, 180, "whisper variants ready")
                order = list(VARIANTS)
                for variant in order:  # warm-up
                    asyncio.run(one_round(url, variant, clips))
                for k in range(args.rounds):
                    for variant in order[k % len(order) :] + order[: k % len(order)]:
                        wall, latencies, errors, words = asyncio.run(one_round(url, variant, clips))
                        s = stats[variant]
                        s["wall"].append(wall)
                        s["latency"].extend(latencies)
                        s["errors"].append(errors)
                        s["words"].append(words)
                        print(f"round {k}: {variant:<24} {len(clips) / wall:5.2f} clips/s  wall {wall:5.2f} s", flush=True)
            finally:
                cluster.stop()

    report: dict[str, object] = {
        "command": "scripts/bench/audio_batching.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "clips": len(clips),
        "audio_seconds_per_round": round(audio_seconds, 2),
        "rounds": args.rounds,
    }
    base = len(clips) * args.rounds / sum(stats[f"{MODEL}-unbatched"]["wall"])
    for variant, s in stats.items():
        throughput = len(clips) * args.rounds / sum(s["wall"])
        row = {
            "clips_per_s": round(throughput, 3),
            "real_time_factor": round(sum(s["wall"]) / (audio_seconds * args.rounds), 4),
            "latency_p50_s": round(statistics.median(s["latency"]), 3),
            "latency_max_s": round(max(s["latency"]), 3),
            "word_error_rate": round(sum(s["errors"]) / sum(s["words"]), 4),
            "vs_unbatched": round(throughput / base, 2),
        }
        report[variant] = row
        print(
            f"{variant:<24} {row['clips_per_s']:.2f} clips/s  RTF {row['real_time_factor']:.3f}  p50 {row['latency_p50_s']:.2f} s  "
            f"WER {row['word_error_rate'] * 100:.1f} %  x{row['vs_unbatched']}"
        )
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
