"""The learned verification stage: after vector recall, is a candidate the same question as the query?

One cosine threshold on one bi-encoder cannot tell "same question, other words" (a paraphrase at cosine
0.80) from "other question, same words" (an opposite at 0.97). The vector search recalls the top-k
candidates at a loose threshold; `Verifier.score` then reads the query and each candidate together and
returns the probability that they ask the same question; the cache serves a candidate whose score is at or
above `Verifier.threshold`. The guard (guard.py) stays in front as a cheap filter.

Features (`features`, one function for training and run time, so they cannot drift; `FEATURES` names them):
  - the cosine of the two sentence vectors (all-MiniLM-L6-v2 with int8 weights, L2-normalised, as the
    embedding-worker serves them);
  - lexical: Jaccard of all words, of content words (guard's stop list dropped), of character 3-grams;
    content words only in one text (count, smaller and larger side); length ratio in characters and words;
    same first word (the question word), same question words; the guard's tests as 0/1 (numbers, codes,
    negation, swapped comparison, renamed entity) and their conjunction;
  - with vectors (`needs_vectors`): the SBERT classification pair [|u - v|, u * v], 2 x 384 values.
All lexical features are symmetric in the two texts, like |u - v| and u * v.

Model: the mean of two classifiers' probabilities over all 786 features (sklearn soft voting): an MLP
(standardised inputs -> 256 ReLU -> 1, L2 alpha 3) and gradient boosting (HistGradientBoostingClassifier,
up to 600 trees, learning rate 0.05, early stopping). Trained by scripts/train_cache_verifier.py on the
36,000 QQP training pairs (../shared/data/cache/qqp_train.jsonl; 25 s to 2.5 min on two cores, by their load, once the
embeddings are cached), exported to ONNX with skl2onnx and shipped as verifier.onnx (1.4 MB); sklearn is
needed only to train. The decision threshold (chosen on qqp_dev.jsonl where 2.0 % of the non-duplicates
pass), the feature names and the vector dimension are in the ONNX metadata; `load` refuses a model whose
feature list differs from this module's.

Dev figures (QQP dev, 4,000 pairs, pairwise, int8 all-MiniLM-L6-v2 vectors; share of duplicates accepted
at the score threshold where 2.5 % / 2.0 % of the non-duplicates are accepted):
  cosine alone                                  25.4 % / 23.2 %
  MLP, lexical + |u-v|, u*v                     39.6 % / 35.2 %
  gradient boosting, lexical + |u-v|, u*v       38.1 % / 34.8 %
  mean of the two (shipped)                     39.8 % / 35.1 %   the model's own threshold 0.8185 (2.0 %)
The cache uses its score in two bands (semantic.py; settings verify_threshold, veto_threshold), chosen on
the same dev set: docs/benchmarks.md, issue 20.
Scoring 10 candidates takes about 0.3 ms (p50 306 µs, p99 479 µs) on one core (features and the ONNX session, one intra-op thread).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from unimodel.cache import guard

MODEL_FILE = Path(__file__).with_name("verifier.onnx")
META_THRESHOLD = "unimodel.verifier.threshold"
META_FEATURES = "unimodel.verifier.features"
META_VECTORS = "unimodel.verifier.vectors"
META_DIM = "unimodel.verifier.dim"

LEXICAL = (
    "cosine",
    "jaccard_words",
    "jaccard_content",
    "jaccard_char3",
    "only_one_side",
    "only_min",
    "only_max",
    "length_ratio_chars",
    "length_ratio_words",
    "min_words",
    "same_first_word",
    "same_question_words",
    "numbers_differ",
    "codes_differ",
    "negation_differs",
    "swapped",
    "renamed",
    "guard_compatible",
)
"""The features every model reads, in column order; with vectors, |u-v| and u*v follow."""

_QUESTION_WORDS = frozenset("what why how which who whom whose when where can could should would is are do does did will".split())


def vector_feature_names(dim: int) -> list[str]:
    return [f"absdiff_{i}" for i in range(dim)] + [f"product_{i}" for i in range(dim)]


def feature_names(vectors: bool, dim: int = 384) -> list[str]:
    return list(LEXICAL) + (vector_feature_names(dim) if vectors else [])


class _Text:
    """What the lexical features need of one text, computed once (the query is shared by its candidates)."""

    def __init__(self, text: str) -> None:
        norm = unicodedata.normalize("NFKC", text).casefold()
        self.text = text
        self.words = guard._WORD.findall(norm)  # the guard's words, so features and guard agree
        self.word_set = frozenset(self.words)
        self.content = frozenset(w for w in self.words if w not in guard._STOP)
        squashed = " ".join(self.words)
        self.char3 = frozenset(squashed[i : i + 3] for i in range(max(len(squashed) - 2, 0)))
        self.chars = len(text.strip())
        self.first = self.words[0] if self.words else ""
        self.questions = self.word_set & _QUESTION_WORDS

    @cached_property
    def numbers(self) -> frozenset[str]:
        return guard.numbers(self.text)

    @cached_property
    def codes(self) -> frozenset[str]:
        return guard.codes(self.text)

    @cached_property
    def negated(self) -> bool:
        return guard.negated(self.text)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _ratio(a: float, b: float) -> float:
    hi = max(a, b)
    return min(a, b) / hi if hi else 1.0


def _lexical(q: _Text, c: _Text, cosine: float) -> list[float]:
    only_q, only_c = len(q.content - c.content), len(c.content - q.content)
    numbers_differ = q.numbers != c.numbers
    codes_differ = q.codes != c.codes
    negation_differs = q.negated != c.negated
    swapped = guard.swapped(q.text, c.text)
    renamed = guard.renamed(q.text, c.text)
    compatible = not (numbers_differ or codes_differ or negation_differs or swapped or renamed)
    return [
        cosine,
        _jaccard(q.word_set, c.word_set),
        _jaccard(q.content, c.content),
        _jaccard(q.char3, c.char3),
        float(only_q + only_c),
        float(min(only_q, only_c)),
        float(max(only_q, only_c)),
        _ratio(q.chars, c.chars),
        _ratio(len(q.words), len(c.words)),
        float(min(len(q.words), len(c.words))),
        float(q.first == c.first),
        float(q.questions == c.questions),
        float(numbers_differ),
        float(codes_differ),
        float(negation_differs),
        float(swapped),
        float(renamed),
        float(compatible),
    ]


def features(
    query: str,
    query_vec: np.ndarray | None,
    candidates: Sequence[str],
    cand_vecs: np.ndarray | None,
    cosines: np.ndarray,
    *,
    vectors: bool,
) -> np.ndarray:
    """float32 [len(candidates), n_features]: the lexical block, then (vectors) |u - v| and u * v."""
    n = len(candidates)
    q = _Text(query)
    lexical = np.array(
        [_lexical(q, _Text(c), float(s)) for c, s in zip(candidates, np.asarray(cosines).reshape(-1), strict=True)],
        dtype=np.float32,
    ).reshape(n, len(LEXICAL))
    if not vectors:
        return lexical
    if query_vec is None or cand_vecs is None:
        raise ValueError("this verifier needs the query and candidate vectors")
    u = np.asarray(query_vec, dtype=np.float32).reshape(1, -1)
    v = np.asarray(cand_vecs, dtype=np.float32).reshape(n, -1)
    return np.concatenate([lexical, np.abs(u - v), u * v], axis=1)


class Verifier:
    """The packaged (or a given) verifier model: `score` candidates, serve those at or above `threshold`."""

    threshold: float
    needs_vectors: bool

    def __init__(self, session, threshold: float, needs_vectors: bool, dim: int) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self._output = "probabilities" if "probabilities" in outputs else outputs[-1]
        self.threshold = threshold
        self.needs_vectors = needs_vectors
        self.dim = dim

    @classmethod
    def load(cls, path: Path | None = None) -> Verifier:
        import onnxruntime as ort

        path = MODEL_FILE if path is None else Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        try:
            threshold = float(meta[META_THRESHOLD])
            needs_vectors = meta[META_VECTORS] == "true"
            dim = int(meta[META_DIM])
            names = json.loads(meta[META_FEATURES])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a cache verifier model (metadata {exc})") from None
        if names != feature_names(needs_vectors, dim):
            raise ValueError(f"{path}: trained on other features than this code computes; retrain it")
        return cls(session, threshold, needs_vectors, dim)

    def score(
        self,
        query: str,
        query_vec: np.ndarray,
        candidates: Sequence[str],
        cand_vecs: np.ndarray | None,
        cosines: np.ndarray,
    ) -> np.ndarray:
        """float32 [len(candidates)]: the probability that each candidate asks the same question as query."""
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        x = features(query, query_vec, candidates, cand_vecs, cosines, vectors=self.needs_vectors)
        out = self._session.run([self._output], {self._input: x})[0]
        if isinstance(out, list):  # ZipMap output: one {label: probability} per row
            return np.array([row[1] for row in out], dtype=np.float32)
        out = np.asarray(out, dtype=np.float32)
        return out[:, 1] if out.ndim == 2 else out.reshape(-1)
