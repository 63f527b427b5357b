"""What a tenant may see of a model: its name, state, instances, input and output specs and limits. Admins
see the full config; tenants never see where the model lives (path, file), where it sends requests
(llm.upstream_url, upstream_model), which secret it reads (llm.upstream_api_key_env), engine or processing
options (their values may be file names, URLs or tokens) or a custom chat template, nor load error texts
(they quote file paths and upstream answers).

The view is built field by field from an allow-list: a field added to ModelConfig later stays hidden from
tenants until it is added here.
"""

from __future__ import annotations

from unimodel.v1 import model_pb2

HIDDEN_ERROR = "the model failed to load (an admin key shows the cause)"


def tenant_view(config: model_pb2.ModelConfig) -> model_pb2.ModelConfig:
    """The part of `config` a tenant key may read."""
    out = model_pb2.ModelConfig(
        name=config.name, engine=config.engine, version=config.version, max_batch_size=config.max_batch_size,
        instance_count=config.instance_count, execution_provider=config.execution_provider,
        replicas=config.replicas, cache=config.cache,
    )
    out.inputs.extend(config.inputs)
    out.outputs.extend(config.outputs)
    if config.HasField("batching"):
        out.batching.CopyFrom(config.batching)
    if config.HasField("processing"):
        out.processing.kind = config.processing.kind
    if config.HasField("llm"):
        llm = config.llm
        out.llm.context_length = llm.context_length
        out.llm.max_prompt_tokens = llm.max_prompt_tokens
        out.llm.max_tokens = llm.max_tokens
        out.llm.default_max_tokens = llm.default_max_tokens
        out.llm.max_sequences = llm.max_sequences
    return out


def tenant_error(error: str) -> str:
    """An instance's load error as a tenant sees it: that there is one, not its text."""
    return HIDDEN_ERROR if error else ""
