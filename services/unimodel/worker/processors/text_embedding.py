"""Processing kind "text-embedding": texts -> tokenizer -> embedding vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.tensors import numpy_dtype
from unimodel.core.value_arrays import array_value
from unimodel.v1 import model_pb2
from unimodel.worker.processors.processor import Processor
from unimodel.worker.tensor_batches import Layout, Prepared


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
