"""A scikit-learn classifier on the iris data bundled with scikit-learn, converted with skl2onnx.

Standard scaling + multinomial logistic regression (lbfgs, deterministic). Outputs `label` INT64 (the
class index) and `probabilities` FP32 [3] (ZipMap disabled, so a plain tensor); labels.txt maps the index
to the class name.
"""

from __future__ import annotations

from pathlib import Path

from unimodel.models.common import MODEL_FILE, OPSET, make_config, tensor
from unimodel.v1 import model_pb2

NAME = "iris-classifier"
SEED = 0
LABELS_FILE = "labels.txt"
CLASSES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")


def train():
    """(fitted pipeline, X float32, y) — the same every run."""
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_iris()
    if tuple(data.target_names) != CLASSES or tuple(data.feature_names) != FEATURES:
        raise ValueError(f"unexpected iris dataset: {list(data.target_names)} / {list(data.feature_names)}")
    x = data.data.astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=SEED))
    clf.fit(x, data.target)
    return clf, x, data.target


def config_iris() -> model_pb2.ModelConfig:
    return make_config(
        NAME,
        inputs=[tensor("features", "FP32", [len(FEATURES)])],
        outputs=[tensor("label", "INT64", []), tensor("probabilities", "FP32", [len(CLASSES)])],
        processing="tabular",
        processing_options={"labels": LABELS_FILE, "feature_names": ",".join(FEATURES)},
        max_batch_size=256,
    )


def build_iris(folder: Path) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    clf, x, _ = train()
    onx = to_onnx(
        clf,
        initial_types=[("features", FloatTensorType([None, x.shape[1]]))],
        options={"zipmap": False},
        target_opset=OPSET,
    )
    (folder / MODEL_FILE).write_bytes(onx.SerializeToString())
    (folder / LABELS_FILE).write_text("\n".join(CLASSES) + "\n")
