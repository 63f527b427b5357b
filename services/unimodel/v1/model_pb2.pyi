from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "dims")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., dims: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size", "priority_levels", "default_priority_level", "default_timeout_ms", "hold_when_idle")
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HOLD_WHEN_IDLE_FIELD_NUMBER: _ClassVar[int]
    max_queue_delay_ms: float
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_size: int
    priority_levels: int
    default_priority_level: int
    default_timeout_ms: int
    hold_when_idle: bool
    def __init__(self, max_queue_delay_ms: _Optional[float] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_size: _Optional[int] = ..., priority_levels: _Optional[int] = ..., default_priority_level: _Optional[int] = ..., default_timeout_ms: _Optional[int] = ..., hold_when_idle: bool = ...) -> None: ...

class Processing(_message.Message):
    __slots__ = ("kind", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, kind: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("name", "engine", "path", "file", "version", "inputs", "outputs", "max_batch_size", "batching", "instance_count", "execution_provider", "processing", "replicas", "options", "llm", "cache")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    path: str
    file: str
    version: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_batch_size: int
    batching: BatchingConfig
    instance_count: int
    execution_provider: str
    processing: Processing
    replicas: int
    options: _containers.ScalarMap[str, str]
    llm: LlmConfig
    cache: bool
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., path: _Optional[str] = ..., file: _Optional[str] = ..., version: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., instance_count: _Optional[int] = ..., execution_provider: _Optional[str] = ..., processing: _Optional[_Union[Processing, _Mapping]] = ..., replicas: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ..., llm: _Optional[_Union[LlmConfig, _Mapping]] = ..., cache: bool = ...) -> None: ...

class LlmConfig(_message.Message):
    __slots__ = ("context_length", "max_prompt_tokens", "max_tokens", "default_max_tokens", "chat_template", "max_sequences", "upstream_url", "upstream_model", "upstream_api_key_env", "migration")
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_URL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_API_KEY_ENV_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    context_length: int
    max_prompt_tokens: int
    max_tokens: int
    default_max_tokens: int
    chat_template: str
    max_sequences: int
    upstream_url: str
    upstream_model: str
    upstream_api_key_env: str
    migration: bool
    def __init__(self, context_length: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., default_max_tokens: _Optional[int] = ..., chat_template: _Optional[str] = ..., max_sequences: _Optional[int] = ..., upstream_url: _Optional[str] = ..., upstream_model: _Optional[str] = ..., upstream_api_key_env: _Optional[str] = ..., migration: bool = ...) -> None: ...
