"""Processing kind "image-classification": a base64 JPEG/PNG -> pixels -> top-k labels."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core.tensors import numpy_dtype
from unimodel.core.values import from_value, to_value
from unimodel.v1 import model_pb2
from unimodel.worker.processors.processor import Processor
from unimodel.worker.tensor_batches import Layout, Prepared


class ImageClassification(Processor):
    """base64 JPEG/PNG -> RGB (options.color: RGB | BGR) -> resize the shorter side to options.resize
    (default size/0.875; options.interpolation: bilinear | bicubic | nearest | lanczos) -> centre crop
    options.size (default: the input's) -> (x * scale - mean) / std (options.scale, default 1/255; mean
    and std per channel, 0..1 scale) -> CHW or HWC by the input's dims (options.layout, when given, must
    agree) -> probabilities (softmax applied unless the output already sums to 1; options.softmax
    true/false forces it) -> top_k (options.top_k, default 5) labels from labels.txt."""

    kind = "image-classification"
    heavy = True
    MAX_PIXELS = 40_000_000
    FORMATS = ("JPEG", "PNG")

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        super().__init__(config, layout)
        if len(layout.inputs) != 1:
            raise self.setup_error("the model must have exactly one input")
        self.input, spec = next(iter(layout.inputs.items()))
        dims = list(spec.dims)
        if len(dims) != 3 or (dims[0] != 3 and dims[2] != 3):
            raise self.setup_error(f"input {self.input!r} must have dims [3, H, W] or [H, W, 3], not {dims}")
        self.channels_first = dims[0] == 3
        layout_opt = self.options.get("layout", "").upper()
        if layout_opt and layout_opt != ("CHW" if self.channels_first else "HWC"):
            raise self.setup_error(f"options.layout {layout_opt} does not match the input's dims {dims}")
        self.bgr = self.options.get("color", "RGB").upper() == "BGR"
        if self.options.get("color", "RGB").upper() not in ("RGB", "BGR"):
            raise self.setup_error("options.color must be RGB or BGR")
        from PIL import Image

        methods = {
            "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
        }
        interpolation = self.options.get("interpolation", "bilinear").lower()
        if interpolation not in methods:
            raise self.setup_error(f"options.interpolation must be one of {', '.join(methods)}")
        self.resample = methods[interpolation]
        h, w = (dims[1], dims[2]) if self.channels_first else (dims[0], dims[1])
        size = self.option_int("size", h if h > 0 else 224)
        if (h > 0 and h != size) or (w > 0 and w != size):
            raise self.setup_error(f"options.size {size} does not match the input's dims {dims}")
        self.size = size
        self.resize = self.option_int("resize", round(size / 0.875))
        if self.size < 1 or self.resize < self.size:
            raise self.setup_error("options.size must be >= 1 and options.resize >= size")
        self.dtype = numpy_dtype(spec.datatype)
        mean = self._floats("mean", "0.485,0.456,0.406")
        std = self._floats("std", "0.229,0.224,0.225")
        if np.any(std == 0):
            raise self.setup_error("options.std must not hold 0")
        pixel_scale = self._fraction("scale", "1/255")
        # x * scale then (x - mean) / std, as one multiply-add
        self.scale = (pixel_scale / std).astype(np.float32)
        self.offset = (mean / std).astype(np.float32)
        self.output = self.options.get("output") or next(iter(layout.outputs))
        if self.output not in layout.outputs:
            raise self.setup_error(f"options.output {self.output!r} is not an output of the model")
        self.outputs = (self.output,)
        self.top_k = self.option_int("top_k", 5)
        self.softmax = self.options.get("softmax", "auto").lower()
        self.label_names = self.labels()

    def _fraction(self, key: str, default: str) -> float:
        raw = (self.options.get(key) or default).replace(" ", "")
        try:
            num, _, den = raw.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise self.setup_error(f"options.{key} {raw!r} is not a number or a fraction like 1/255") from None
        if value <= 0:
            raise self.setup_error(f"options.{key} must be > 0")
        return value

    def _floats(self, key: str, default: str) -> np.ndarray:
        raw = self.options.get(key) or default
        try:
            values = np.array([float(x) for x in raw.replace(" ", "").split(",")], dtype=np.float32)
        except ValueError:
            raise self.setup_error(f"options.{key} {raw!r} is not a comma separated list of numbers") from None
        if values.size not in (1, 3):
            raise self.setup_error(f"options.{key} needs 1 or 3 numbers")
        return np.broadcast_to(values, (3,)).copy()

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        top_k = self.top_k
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            fields = value.struct_value.fields
            image = fields.get("image")
            if image is None or image.WhichOneof("kind") != "string_value":
                raise self.bad('input object needs "image": a base64 JPEG or PNG')
            extra = set(fields) - {"image", "top_k"}
            if extra:
                raise self.bad(f"unknown input field {sorted(extra)[0]!r} (fields: image, top_k)")
            if "top_k" in fields:
                k = from_value(fields["top_k"])
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise self.bad("top_k must be a positive integer")
                top_k = k
            text = image.string_value
        elif kind == "string_value":
            text = value.string_value
        else:
            raise self.bad('input must be a base64 JPEG/PNG string or {"image": "<base64>", "top_k": k}')
        pixels = self.decode(text)
        return Prepared({self.input: pixels[None]}, 1, self.outputs, context=top_k)

    def decode(self, text: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.bad("input is not valid base64") from None
        if not data:
            raise self.bad("input is empty")
        try:
            with Image.open(io.BytesIO(data), formats=self.FORMATS) as img:
                if img.width * img.height > self.MAX_PIXELS:
                    raise self.bad(f"image of {img.width}x{img.height} pixels is too large")
                img.draft("RGB", (self.resize, self.resize))  # JPEG: decode at a reduced scale
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise self.bad("input is not a JPEG or PNG image") from None
        w, h = rgb.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        rgb = rgb.resize((nw, nh), self.resample)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        rgb = rgb.crop((left, top, left + self.size, top + self.size))
        x = np.asarray(rgb, dtype=np.float32)  # HWC, RGB
        if self.bgr:
            x = x[:, :, ::-1]
        x = x * self.scale - self.offset  # mean / std given in the model's channel order
        if self.channels_first:
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        scores = np.asarray(outputs[self.output], dtype=np.float64).reshape(-1)
        if self.softmax == "true" or (
            self.softmax == "auto" and (scores.min(initial=0.0) < 0 or abs(scores.sum() - 1.0) > 1e-3)
        ):
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        k = min(int(item.context), scores.size)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        names = self.label_names
        labels = [
            {"label": names[i] if i < len(names) else str(i), "index": int(i), "score": float(scores[i])} for i in top
        ]
        return to_value({"labels": labels})
