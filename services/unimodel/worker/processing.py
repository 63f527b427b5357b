"""Pre- and post-processing for the UniModel predict API (value items), by `config.processing.kind`.

A processor turns each item's JSON value into engine input arrays (`prepare`, a whole batch at once)
and the engine's output rows back into a JSON value (`finish`). A bad input fails that item alone
with InvalidArgument. Plain logic: no transport, no engine; assets (tokenizer.json, labels.txt) are
read when the processor is built, at model load.

kinds:
  none                  {"<input>": nested list, ...} (or a bare nested list for a one-input model)
                        -> {"<output>": nested list, ...}; a value without the batch dimension is one row
  text-embedding        "text" | ["text", ...] -> {"embedding": [...], "tokens": n}
                        | {"embeddings": [[...], ...], "tokens": [n, ...]}
  image-classification  "<base64 JPEG/PNG>" | {"image": "<base64>", "top_k": k}
                        -> {"labels": [{"label", "index", "score"}, ...]}
  tabular               [f1, .., fn] | [[f1, .., fn], ...]
                        -> {"label", "index", "scores": {label: p}} (a list of them for a list of rows)
"""

from __future__ import annotations

import abc
import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.tensors import numpy_dtype
from unimodel.core.value_arrays import array_value, numbers, numeric_array  # noqa: F401 (re-exported)
from unimodel.core.values import from_value, to_value
from unimodel.v1 import model_pb2
from unimodel.worker.batching import Layout, Prepared

# ---------------------------------------------------------------------------------------------------
class Processor(abc.ABC):
    kind: ClassVar[str] = "none"
    # Prepare / finish off the event loop even for small batches (image decode, tokenization).
    heavy: ClassVar[bool] = False

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        self.config = config
        self.layout = layout
        self.model = config.name
        self.options = dict(config.processing.options)
        self.outputs: tuple[str, ...] = layout.output_names  # what the engine is asked for

    def prepare(self, values: Sequence[struct_pb2.Value]) -> list[Prepared | errors.UnimodelError]:
        out: list[Prepared | errors.UnimodelError] = []
        for value in values:
            try:
                out.append(self.prepare_one(value))
            except errors.UnimodelError as exc:
                out.append(exc)
        return out

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        raise NotImplementedError

    @abc.abstractmethod
    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        """The item's answer from its output rows."""

    # helpers
    def bad(self, message: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"model {self.model!r}: {message}", model=self.model, field="input")

    def setup_error(self, message: str) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(f"model {self.model!r} ({self.kind} processing): {message}")

    def asset(self, key: str, default: str, *, required: bool) -> Path | None:
        name = self.options.get(key, "")
        path = Path(self.config.path) / (name or default)
        if path.is_file():
            return path
        if required or name:
            raise self.setup_error(f"{path} does not exist (options.{key})")
        return None

    def option_int(self, key: str, default: int) -> int:
        raw = self.options.get(key, "")
        try:
            return int(raw) if raw else default
        except ValueError:
            raise self.setup_error(f"options.{key} {raw!r} is not an integer") from None

    def labels(self) -> list[str]:
        path = self.asset("labels", "labels.txt", required=False)
        if path is None:
            return []
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class PassThrough(Processor):
    """kind "none": values are the tensors themselves, by input name."""

    kind = "none"

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        layout = self.layout
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            fields = value.struct_value.fields
            unknown = [k for k in fields if k not in layout.inputs]
            if unknown:
                raise self.bad(f"no input {unknown[0]!r} (inputs: {', '.join(layout.inputs)})")
            missing = [k for k in layout.inputs if k not in fields]
            if missing:
                raise self.bad(f"missing input {missing[0]!r}")
            given = {name: fields[name] for name in layout.inputs}
        elif len(layout.inputs) == 1 and kind in ("list_value", "number_value", "bool_value", "string_value"):
            given = {next(iter(layout.inputs)): value}
        else:
            raise self.bad(f"input must be an object {{input name: nested list}} (inputs: {', '.join(layout.inputs)})")
        arrays: dict[str, np.ndarray] = {}
        single: bool | None = None
        rows = 1
        for name, v in given.items():
            spec = layout.inputs[name]
            arr = self._array(spec, v)
            want = len(spec.dims)
            if layout.batches:
                if arr.ndim == want:
                    is_single, arr = True, arr[None]
                elif arr.ndim == want + 1:
                    is_single = False
                else:
                    raise self.bad(f"input {name!r} has {arr.ndim} dimensions, expected {want} (one row) or {want + 1}")
                if single is not None and is_single != single:
                    raise self.bad("inputs disagree: some are one row, some a list of rows")
                single = is_single
                if arr.shape[0] < 1:
                    raise self.bad(f"input {name!r} has no rows")
                if name == next(iter(given)):
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise self.bad(f"input {name!r} has {arr.shape[0]} rows, the first input {rows}")
                shape = arr.shape[1:]
            else:
                shape = arr.shape
            if len(shape) != want or any(d != -1 and d != s for d, s in zip(spec.dims, shape, strict=True)):
                dims = ", ".join(str(d) for d in spec.dims)
                raise self.bad(f"input {name!r} has shape {list(shape)}, expected [{dims}]")
            arrays[name] = arr
        return Prepared(arrays, rows, self.outputs, context=bool(single) or not layout.batches)

    def _array(self, spec: model_pb2.TensorSpec, value: struct_pb2.Value) -> np.ndarray:
        what = f"input {spec.name!r}"
        if spec.datatype == "BYTES":
            obj = from_value(value)
            try:
                arr = np.array(obj, dtype=np.object_)
            except ValueError:
                raise self.bad(f"{what}: not a rectangular list") from None
            if any(not isinstance(x, str) for x in arr.reshape(-1)):
                raise self.bad(f"{what}: expected strings")
            return arr
        try:
            return numeric_array(value, numpy_dtype(spec.datatype), what)
        except errors.InvalidArgument as exc:
            raise self.bad(exc.message) from None

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        single = item.context and self.layout.batches
        out = struct_pb2.Value()
        fields = out.struct_value.fields
        for name, arr in outputs.items():
            fields[name].CopyFrom(array_value(arr[0] if single else arr))
        return out


class TextEmbedding(Processor):
    """Tokenizer (tokenizer.json, `tokenizers` library; no torch) -> input_ids / attention_mask /
    token_type_ids padded to the longest text of the batch -> embedding, mean-pooled over the attention
    mask when the model returns one vector per token, L2-normalised (options.normalize: false to skip).
    options: tokenizer (tokenizer.json), max_length (512), output (the first output)."""

    kind = "text-embedding"
    heavy = True
    FEEDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        super().__init__(config, layout)
        from tokenizers import Tokenizer

        for name, spec in layout.inputs.items():
            if name not in self.FEEDS:
                raise self.setup_error(f"cannot fill input {name!r} (known: {', '.join(self.FEEDS)})")
            if spec.datatype not in ("INT64", "INT32"):
                raise self.setup_error(f"input {name!r} must be INT64 or INT32, not {spec.datatype}")
        if "input_ids" not in layout.inputs:
            raise self.setup_error("the model has no input_ids input")
        self.output = self.options.get("output") or next(iter(layout.outputs))
        if self.output not in layout.outputs:
            raise self.setup_error(f"options.output {self.output!r} is not an output of the model")
        self.outputs = (self.output,)
        self.normalize = self.options.get("normalize", "true").lower() not in ("false", "0", "no")
        path = self.asset("tokenizer", "tokenizer.json", required=True)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise self.setup_error(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None
        max_length = self.option_int("max_length", 512)
        fixed = [spec.dims[-1] for spec in layout.inputs.values() if spec.dims and spec.dims[-1] > 0]
        if fixed:
            max_length = min(max_length, fixed[0])
        if max_length < 1:
            raise self.setup_error("options.max_length must be >= 1")
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length)
        pad = self.tokenizer.padding or {}
        pad_id = pad.get("pad_id", 0)
        pad_token = pad.get("pad_token", "[PAD]")
        for token in ("[PAD]", "<pad>"):
            if not pad and self.tokenizer.token_to_id(token) is not None:
                pad_id, pad_token = self.tokenizer.token_to_id(token), token
                break
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=fixed[0] if fixed else None)
        self.dtypes = {name: numpy_dtype(spec.datatype) for name, spec in layout.inputs.items()}

    def _texts(self, value: struct_pb2.Value) -> tuple[list[str], bool]:
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return [value.string_value], True
        if kind == "list_value":
            texts = []
            for v in value.list_value.values:
                if v.WhichOneof("kind") != "string_value":
                    raise self.bad("input must be a string or a list of strings")
                texts.append(v.string_value)
            if not texts:
                raise self.bad("input is an empty list")
            return texts, False
        raise self.bad("input must be a string or a list of strings")

    def prepare(self, values: Sequence[struct_pb2.Value]) -> list[Prepared | errors.UnimodelError]:
        out: list[Prepared | errors.UnimodelError] = []
        texts: list[str] = []
        spans: list[tuple[int, int, bool]] = []
        for value in values:
            try:
                item_texts, single = self._texts(value)
            except errors.UnimodelError as exc:
                out.append(exc)
                continue
            spans.append((len(texts), len(texts) + len(item_texts), single))
            texts.extend(item_texts)
            out.append(Prepared({}, len(item_texts), self.outputs))
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts)
        feeds = {
            name: np.array([getattr(e, self.FEEDS[name]) for e in encodings], dtype=dtype)
            for name, dtype in self.dtypes.items()
        }
        mask = feeds.get("attention_mask")
        if mask is None:
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        spans_iter = iter(spans)
        for p in out:
            if isinstance(p, Prepared):
                start, end, single = next(spans_iter)
                p.inputs = {name: arr[start:end] for name, arr in feeds.items()}
                p.context = (single, mask[start:end])
        return out

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        single, mask = item.context
        emb = np.asarray(outputs[self.output], dtype=np.float32)
        if emb.ndim == 3:  # one vector per token: mean over the real (unpadded) tokens
            m = mask[:, : emb.shape[1], None].astype(np.float32)
            emb = (emb * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        elif emb.ndim != 2:
            raise errors.Internal(f"model {self.model!r}: output {self.output!r} has shape {list(emb.shape)}")
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        out = struct_pb2.Value()
        tokens = mask.sum(axis=1)  # the real tokens of each text (OpenAI's usage.prompt_tokens)
        fields = out.struct_value.fields
        if single:
            fields["embedding"].CopyFrom(array_value(emb[0]))
            fields["tokens"].number_value = int(tokens[0])
        else:
            fields["embeddings"].CopyFrom(array_value(emb))
            fields["tokens"].CopyFrom(array_value(tokens))
        return out


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


class Tabular(Processor):
    """One row of numbers [f1..fn] or a list of rows -> {"label", "index", "scores": {label: p}} per
    row. Outputs: the first integer or BYTES output is the label (options.label_output), the first
    float output the scores (options.scores_output); labels.txt names the classes."""

    kind = "tabular"

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        super().__init__(config, layout)
        if len(layout.inputs) != 1:
            raise self.setup_error("the model must have exactly one input")
        self.input, spec = next(iter(layout.inputs.items()))
        if len(spec.dims) != 1 or spec.dims[0] < 1 or not layout.batches:
            raise self.setup_error(f"input {self.input!r} must have dims [n] with n fixed, and the model must batch")
        self.features = int(spec.dims[0])
        self.dtype = numpy_dtype(spec.datatype)

        def pick(key: str, kinds: str) -> str:
            name = self.options.get(key, "")
            if name:
                if name not in layout.outputs:
                    raise self.setup_error(f"options.{key} {name!r} is not an output of the model")
                return name
            for o in layout.outputs.values():
                if (o.datatype == "BYTES" and "S" in kinds) or (o.datatype != "BYTES" and numpy_dtype(o.datatype).kind in kinds):
                    return o.name
            return ""

        self.label_output = pick("label_output", "iuS")
        self.scores_output = pick("scores_output", "f")
        if not self.scores_output and not self.label_output:
            raise self.setup_error("the model has neither a label nor a scores output")
        self.outputs = tuple(n for n in (self.label_output, self.scores_output) if n)
        self.label_names = self.labels()

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        if value.WhichOneof("kind") != "list_value" or not value.list_value.values:
            raise self.bad(f"input must be a row of {self.features} numbers or a list of rows")
        first = value.list_value.values[0].WhichOneof("kind")
        single = first != "list_value"
        if single:
            n = len(value.list_value.values)
            if n != self.features:
                raise self.bad(f"the row has {n} values, expected {self.features}")
        else:
            for i, row in enumerate(value.list_value.values):
                if row.WhichOneof("kind") != "list_value" or len(row.list_value.values) != self.features:
                    n = len(row.list_value.values) if row.WhichOneof("kind") == "list_value" else 1
                    raise self.bad(f"row {i} has {n} values, expected {self.features}")
        try:
            arr = numeric_array(value, self.dtype, "input")
        except errors.InvalidArgument:
            raise self.bad("rows must hold numbers only") from None
        if arr.ndim != (1 if single else 2):
            raise self.bad("rows must hold numbers only")
        if single:
            arr = arr[None]
        return Prepared({self.input: arr}, arr.shape[0], self.outputs, context=single)

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        names = self.label_names
        scores = outputs.get(self.scores_output) if self.scores_output else None
        labels = outputs.get(self.label_output) if self.label_output else None
        rows = []
        for r in range(item.rows):
            row_scores = None if scores is None else np.asarray(scores[r], dtype=np.float64).reshape(-1)
            if labels is not None and labels.dtype.kind in "iu":
                index = int(labels[r])
                name = names[index] if 0 <= index < len(names) else str(index)
            elif labels is not None:
                raw = labels[r]
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                index = names.index(name) if name in names else (int(np.argmax(row_scores)) if row_scores is not None else -1)
            else:
                assert row_scores is not None
                index = int(np.argmax(row_scores))
                name = names[index] if index < len(names) else str(index)
            row: dict[str, Any] = {"label": name, "index": index}
            if row_scores is not None:
                row["scores"] = {
                    (names[j] if j < len(names) else str(j)): float(p) for j, p in enumerate(row_scores)
                }
            rows.append(row)
        return to_value(rows[0] if item.context else rows)


PROCESSORS: dict[str, type[Processor]] = {
    "none": PassThrough,
    "text-embedding": TextEmbedding,
    "image-classification": ImageClassification,
    "tabular": Tabular,
}


def make_processor(config: model_pb2.ModelConfig, layout: Layout | None = None) -> Processor:
    """The processor of `config` with its assets read (call off the event loop: it reads files)."""
    kind = config.processing.kind or "none"
    cls = PROCESSORS.get(kind)
    if cls is None:
        raise errors.FailedPrecondition(f"model {config.name!r}: unknown processing kind {kind!r}")
    return cls(config, layout or Layout.of(config))
