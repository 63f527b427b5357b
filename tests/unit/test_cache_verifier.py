"""The semantic cache's verification stage: the packaged model, its features and its decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from helpers.minilm import Embedder
from unimodel.cache import verifier
from unimodel.cache.verifier import Verifier

# clear cases (scores far from the threshold: they stay on either side when the model is retrained);
# the borderline everyday paraphrases it misses are in docs/benchmarks.md (cache quality)
PARAPHRASES = [
    ("How do I improve my English speaking skills?", "How can I improve my spoken English?"),
    ("What is the meaning of life?", "What is life's meaning?"),
    ("How do I make a website?", "How can I create a website?"),
]
DIFFERENT = [
    ("How do I become a doctor?", "How do I become a lawyer?"),
    ("What is the capital of Australia?", "What is the capital of Austria?"),
    ("Why do cats purr?", "Why do cats meow?"),
    ("What is the best way to learn guitar?", "What is the best way to learn piano?"),
]


@pytest.fixture(scope="module")
def model() -> Verifier:
    return Verifier.load()


@pytest.fixture(scope="module")
def embed(model_repository: Path):
    """texts -> vectors as the embedding-worker serves all-minilm-l6-v2 (the model mean-pools and normalises)."""
    embedder = Embedder(model_repository / "all-minilm-l6-v2")
    return lambda texts: asyncio.run(embedder(texts))


def score_pair(model: Verifier, embed, query: str, cached: str) -> float:
    u, v = embed([query, cached])
    out = model.score(query, u, [cached], v[None, :], np.array([u @ v], dtype=np.float32))
    return float(out[0])


def test_packaged_model_loads_with_its_threshold(model: Verifier) -> None:
    assert verifier.MODEL_FILE.is_file()
    assert 0.0 < model.threshold < 1.0
    assert model.needs_vectors is True


@pytest.mark.parametrize(("query", "cached"), PARAPHRASES)
def test_paraphrases_pass(model: Verifier, embed, query: str, cached: str) -> None:
    assert score_pair(model, embed, query, cached) >= model.threshold
    assert score_pair(model, embed, cached, query) >= model.threshold


@pytest.mark.parametrize(("query", "cached"), DIFFERENT)
def test_other_questions_fail(model: Verifier, embed, query: str, cached: str) -> None:
    assert score_pair(model, embed, query, cached) < model.threshold
    assert score_pair(model, embed, cached, query) < model.threshold


def test_scores_a_batch_of_candidates(model: Verifier, embed) -> None:
    query = "What is the capital of Australia?"
    candidates = ["Which city is Australia's capital?", "What is the capital of Austria?", "How many calories are in a banana?"]
    vecs = embed([query, *candidates])
    cosines = vecs[1:] @ vecs[0]
    out = model.score(query, vecs[0], candidates, vecs[1:], cosines)
    assert out.shape == (3,) and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    one_by_one = [model.score(query, vecs[0], [c], vecs[1 + i : 2 + i], cosines[i : i + 1])[0] for i, c in enumerate(candidates)]
    np.testing.assert_allclose(out, one_by_one, rtol=1e-5, atol=1e-6)


def test_no_candidates(model: Verifier) -> None:
    out = model.score("anything", np.zeros(384, np.float32), [], np.zeros((0, 384), np.float32), np.zeros(0, np.float32))
    assert out.shape == (0,) and out.dtype == np.float32


def test_features_are_deterministic_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((2, 384)).astype(np.float32)
    a, b = "Is Messi better than Ronaldo in 2019?", "Is Ronaldo better than Messi in 2021?"
    f1 = verifier.features(a, u, [b], v[None, :], np.array([0.9]), vectors=True)
    f2 = verifier.features(a, u, [b], v[None, :], np.array([0.9]), vectors=True)
    back = verifier.features(b, v, [a], u[None, :], np.array([0.9]), vectors=True)
    assert f1.shape == (1, len(verifier.feature_names(True, 384))) and f1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(f1, back)
    named = dict(zip(verifier.LEXICAL, f1[0, : len(verifier.LEXICAL)], strict=True))
    assert named["numbers_differ"] == 1.0 and named["guard_compatible"] == 0.0 and named["cosine"] == pytest.approx(0.9)
    lexical = verifier.features(a, None, [b], None, np.array([0.9]), vectors=False)
    np.testing.assert_array_equal(lexical, f1[:, : len(verifier.LEXICAL)])


def test_vectors_required_when_the_model_reads_them(model: Verifier) -> None:
    with pytest.raises(ValueError, match="vectors"):
        model.score("a?", np.zeros(384, np.float32), ["b?"], None, np.array([0.5], np.float32))


def test_refuses_a_model_with_other_features(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")  # the models extra

    onx = onnx.load(str(verifier.MODEL_FILE))
    for prop in onx.metadata_props:
        if prop.key == verifier.META_FEATURES:
            prop.value = '["cosine"]'
    path = tmp_path / "other.onnx"
    onnx.save(onx, str(path))
    with pytest.raises(ValueError, match="other features"):
        Verifier.load(path)
