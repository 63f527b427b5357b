"""all-MiniLM-L6-v2 run with onnxruntime in the test process (the cache's embedder, without a worker), and a
clock the tests move by hand: what the tests of the cache's logic on its real stores share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Embedder:
    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.calls = 0

    async def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        enc = self.tokenizer.encode_batch(list(texts))
        feeds = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        }
        return self.session.run(None, feeds)[0].astype(np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now
