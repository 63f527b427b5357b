#!/usr/bin/env python3
"""Can one cache rule meet both of issue 20's quality targets? The best each score allows, offline.

    .venv/bin/python scripts/bench/cache_frontier.py [--cross-encoder .cache/cross-encoder]
        [--json docs/benchmarks/cache_frontier.json]

Targets (issue 20, default settings): QQP dev (pairwise) >= 50 % of duplicates served with <= 2.5 % false
hits, and GPTCache mock data >= 98 % precision at >= 80 % hit rate. This script searches a family of cache
rules for each score and reports the best it finds on both sets together, without a cluster (the same
vectors, guard and verifier as the cache: cache_quality.py measures the shipped rule through the gateway).

A candidate (the top 4 of the vector search by cosine) is accepted when the guard lets it through and
    cosine >= high and score >= veto,   or   cosine >= low and score >= s;
the served one is the accepted candidate of highest cosine, and nothing is served when another accepted
candidate with a different answer is within the margin of it (ambiguous; the cache's `ambiguity_margin`,
default 0.02). Grid: margin 0.02, 0.03, 0.05; high 0.86-0.96 or off (0.70-0.99 for cosine alone); low
0.60-0.85; veto none or the score's 10th/25th percentile on QQP dev; s at 60 quantiles of the score.
Scores: cosine alone; the shipped verifier (unimodel.cache.verifier); with --cross-encoder, a model trained by
scripts/train_cache_cross_encoder.py (sigmoid of the mean logit of both orders) and the mean of the two
scores' ranks on QQP dev (a GPTCache score is placed by the same dev distribution).

GPTCache's questions are all in one scope (the 999 `origin`s, their index as the answer), as in
cache_quality.py, and a hit is correct when it serves the pair's own index. 63 of the 999 origins share their
text with another; the `gpt_precision_text` figures also count as correct an entry whose question is the
query's own `origin` text (which of two identical questions answers is not a semantic error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "scripts"))

import train_cache_verifier as shipped  # noqa: E402  (data, vectors and verifier scores as the verifier's training)

TOP_K = 4
MARGINS = (0.02, 0.03, 0.05)  # the cache's ambiguity_margin (default 0.02)
FALSE_HITS = 0.025  # QQP: at most this share of non-duplicates served
PRECISION, HIT_RATE, DUPLICATES = 0.98, 0.80, 0.50


class Sets:
    """Both sets' pairs, vectors, guard verdicts and candidates, computed once."""

    def __init__(self) -> None:
        from unimodel.cache import guard

        da, db, self.dy = shipped.load_pairs("dev")
        self.qqp = (db, da)  # b is asked, a is in the cache (cache_quality.py's pairwise mode)
        ua, ub = shipped.embeddings("dev", da, db, ROOT / ".cache" / "verifier-embeddings", shipped.MODEL_REPOSITORY)
        self.qqp_vectors = (ub, ua)
        self.qqp_cos = (ua * ub).sum(1)
        self.qqp_guard = np.array([guard.compatible(b, a) for a, b in zip(da, db, strict=True)])
        mock = json.loads((shipped.DATA / "gptcache_mock_data.json").read_text())
        self.origins = [m["origin"] for m in mock]
        self.similar = [m["similar"] for m in mock]
        embed = shipped.embedder(shipped.MODEL_REPOSITORY)
        self.gpt_o, self.gpt_s = embed(self.origins), embed(self.similar)
        sim = self.gpt_s @ self.gpt_o.T
        self.top = np.argsort(-sim, axis=1)[:, :TOP_K]
        self.gpt_cos = np.take_along_axis(sim, self.top, axis=1)
        self.gpt_guard = np.array([[guard.compatible(q, self.origins[j]) for j in row] for q, row in zip(self.similar, self.top, strict=True)])
        texts = np.array(self.origins, dtype=object)
        self.same_text = texts[self.top] == texts[:, None]
        self.own = self.top == np.arange(len(mock))[:, None]

    def gpt_pairs(self) -> tuple[list[str], list[str]]:
        """(query, candidate) of every GPTCache candidate, row-major over [query, TOP_K]."""
        return [q for q in self.similar for _ in range(TOP_K)], [self.origins[j] for row in self.top for j in row]


def verifier_scores(sets: Sets) -> tuple[np.ndarray, np.ndarray]:
    from unimodel.cache.verifier import Verifier

    model = Verifier.load()
    qqp = shipped.pair_scores(model, *sets.qqp, *sets.qqp_vectors)
    gpt = np.stack(
        [
            model.score(sets.similar[q], sets.gpt_s[q], [sets.origins[j] for j in row], sets.gpt_o[row], sets.gpt_cos[q].astype(np.float32))
            for q, row in enumerate(sets.top)
        ]
    )
    return qqp, gpt


def cross_encoder_scores(sets: Sets, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import train_cache_cross_encoder as ce

    model, tokenizer = ce.load(folder)
    qqp = ce.symmetric_logits(model, tokenizer, *sets.qqp)
    gpt = ce.symmetric_logits(model, tokenizer, *sets.gpt_pairs()).reshape(-1, TOP_K)
    return 1 / (1 + np.exp(-qqp)), 1 / (1 + np.exp(-gpt))


def outcome(sets: Sets, qqp_ok: np.ndarray, gpt_ok: np.ndarray, margin: float) -> dict[str, float]:
    """The two sets' figures for one rule, given which pairs / candidates it accepts."""
    first = np.where(gpt_ok.any(1), gpt_ok.argmax(1), -1)  # candidates are in cosine order
    rows = np.flatnonzero(first >= 0)
    best = first[rows]
    close = sets.gpt_cos[rows, best][:, None] - sets.gpt_cos[rows] < margin
    close[np.arange(len(rows)), best] = False  # every other candidate has another answer (its own index)
    ambiguous = (gpt_ok[rows] & close).any(1)
    served, chosen = rows[~ambiguous], best[~ambiguous]
    hits = max(len(served), 1)
    return {
        "qqp_duplicates": float(qqp_ok[sets.dy].mean()),
        "qqp_false_hits": float(qqp_ok[~sets.dy].mean()),
        "gpt_precision": float(sets.own[served, chosen].sum() / hits),
        "gpt_precision_text": float(sets.same_text[served, chosen].sum() / hits),
        "gpt_hit_rate": len(served) / len(sets.top),
    }


def search(sets: Sets, scores: tuple[np.ndarray, np.ndarray] | None) -> list[dict[str, float]]:
    """Every rule of the grid on both sets; `scores`: (QQP, GPTCache) scores, None for cosine alone."""
    results = []
    highs = (0.86, 0.88, 0.90, 0.92, 0.94, 0.96, 2.0)
    lows = (0.60, 0.70, 0.75, 0.80, 0.85) if scores is not None else (2.0,)
    if scores is None:  # cosine alone: the high threshold decides
        qqp_score, gpt_score = np.zeros_like(sets.qqp_cos), np.zeros_like(sets.gpt_cos)
        highs = tuple(np.round(np.arange(0.70, 1.0, 0.01), 2))
        vetoes, levels = [-1.0], [2.0]
    else:
        qqp_score, gpt_score = scores
        vetoes = [-1.0, *np.quantile(qqp_score, [0.10, 0.25])]
        levels = list(np.quantile(qqp_score, np.linspace(0.40, 0.995, 60)))
    for high in highs:
        for low in lows:
            for veto in vetoes:
                for level in levels:
                    q = sets.qqp_guard & (((sets.qqp_cos >= high) & (qqp_score >= veto)) | ((sets.qqp_cos >= low) & (qqp_score >= level)))
                    g = sets.gpt_guard & (((sets.gpt_cos >= high) & (gpt_score >= veto)) | ((sets.gpt_cos >= low) & (gpt_score >= level)))
                    for margin in MARGINS:
                        rule = {"margin": margin, "high": float(high), "low": float(low), "veto": float(veto), "s": float(level)}
                        results.append({**rule, **outcome(sets, q, g, margin)})
    return results


def summary(name: str, results: list[dict[str, float]]) -> dict[str, object]:
    within = [r for r in results if r["qqp_false_hits"] <= FALSE_HITS]
    precise = [r for r in within if r["gpt_precision"] >= PRECISION]
    gpt_met = [r for r in results if r["gpt_precision"] >= PRECISION and r["gpt_hit_rate"] >= HIT_RATE]
    any_precise = [r for r in results if r["gpt_precision"] >= PRECISION]
    both = [r for r in precise if r["gpt_hit_rate"] >= HIT_RATE and r["qqp_duplicates"] >= DUPLICATES]
    best: dict[str, dict[str, float] | None] = {
        "best_qqp": max(within, key=lambda r: r["qqp_duplicates"], default=None),
        "best_gpt": max(any_precise, key=lambda r: r["gpt_hit_rate"], default=None),
        "best_gpt_within_qqp_false_hits": max(precise, key=lambda r: r["gpt_hit_rate"], default=None),
        "least_qqp_false_hits_with_gpt_target": min(gpt_met, key=lambda r: r["qqp_false_hits"], default=None),
    }

    def fmt(r: dict[str, float] | None) -> str:
        if r is None:
            return "none"
        return (
            f"QQP {r['qqp_duplicates'] * 100:.1f} % at {r['qqp_false_hits'] * 100:.2f} %; "
            f"GPTCache {r['gpt_precision'] * 100:.1f} % ({r['gpt_precision_text'] * 100:.1f} % by text) "
            f"at {r['gpt_hit_rate'] * 100:.1f} % [margin {r['margin']:.2f} high {r['high']:.2f} low {r['low']:.2f} "
            f"veto {r['veto']:.3f} s {r['s']:.3f}]"
        )

    print(f"\n{name} ({len(results)} rules)")
    print(f"  most QQP duplicates at <= 2.5 % false hits:      {fmt(best['best_qqp'])}")
    print(f"  most GPTCache hits at >= 98 % (QQP aside):         {fmt(best['best_gpt'])}")
    print(f"  most GPTCache hits at >= 98 %, QQP <= 2.5 %:       {fmt(best['best_gpt_within_qqp_false_hits'])}")
    print(f"  fewest QQP false hits with GPTCache >= 98 % @ 80 %: {fmt(best['least_qqp_false_hits_with_gpt_target'])}")
    print(f"  rules meeting both targets: {len(both)}")
    return {"rules": len(results), **best, "both_targets": len(both)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cross-encoder", type=Path, help="a model folder from scripts/train_cache_cross_encoder.py")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    sets = Sets()
    report: dict[str, object] = {"command": " ".join(sys.argv), "top_k": TOP_K, "margins": MARGINS}
    report["cosine"] = summary("cosine alone", search(sets, None))
    vq, vg = verifier_scores(sets)
    report["verifier"] = summary("shipped verifier", search(sets, (vq, vg)))
    if args.cross_encoder:
        cq, cg = cross_encoder_scores(sets, args.cross_encoder)
        report["cross_encoder"] = summary("cross-encoder", search(sets, (cq, cg)))
        sorted_v, sorted_c = np.sort(vq), np.sort(cq)

        def rank(sorted_dev: np.ndarray, x: np.ndarray) -> np.ndarray:
            return np.searchsorted(sorted_dev, x) / len(sorted_dev)

        mq = (rank(sorted_v, vq) + rank(sorted_c, cq)) / 2
        mg = (rank(sorted_v, vg) + rank(sorted_c, cg)) / 2
        report["rank_mean"] = summary("rank mean of verifier and cross-encoder", search(sets, (mq, mg)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
