from google.protobuf import struct_pb2 as _struct_pb2
from unimodel.v1 import errors_pb2 as _errors_pb2
from unimodel.v1 import generate_pb2 as _generate_pb2
from unimodel.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("model", "input", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: _struct_pb2.Value
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "output", "worker_id", "path")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    model: str
    output: _struct_pb2.Value
    worker_id: str
    path: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., worker_id: _Optional[str] = ..., path: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("request_id", "input", "deadline_unix_ms", "parameters", "reply_to", "trace_context", "inputs", "outputs", "priority", "rows", "id", "reply_group", "generate", "tenant", "blob")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_GROUP_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input: _struct_pb2.Value
    deadline_unix_ms: int
    parameters: _containers.ScalarMap[str, str]
    reply_to: str
    trace_context: _containers.ScalarMap[str, str]
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    rows: int
    id: str
    reply_group: str
    generate: _generate_pb2.GenerateRequest
    tenant: str
    blob: BlobRef
    def __init__(self, request_id: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., parameters: _Optional[_Mapping[str, str]] = ..., reply_to: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ..., rows: _Optional[int] = ..., id: _Optional[str] = ..., reply_group: _Optional[str] = ..., generate: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ..., tenant: _Optional[str] = ..., blob: _Optional[_Union[BlobRef, _Mapping]] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("subject", "size", "local")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    subject: str
    size: int
    local: str
    def __init__(self, subject: _Optional[str] = ..., size: _Optional[int] = ..., local: _Optional[str] = ...) -> None: ...

class ItemBundle(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...

class EncodedItemBundle(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, items: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReplyBatch(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[ItemReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[ItemReply, _Mapping]]] = ...) -> None: ...

class ItemReply(_message.Message):
    __slots__ = ("reply_to", "response", "error")
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reply_to: str
    response: bytes
    error: _errors_pb2.ErrorDetail
    def __init__(self, reply_to: _Optional[str] = ..., response: _Optional[bytes] = ..., error: _Optional[_Union[_errors_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model", "model_version", "id", "outputs", "worker_id", "path", "queue_ns", "compute_ns", "batch_rows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    id: str
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    worker_id: str
    path: _containers.RepeatedScalarFieldContainer[str]
    queue_ns: int
    compute_ns: int
    batch_rows: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., worker_id: _Optional[str] = ..., path: _Optional[_Iterable[str]] = ..., queue_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("batch_id", "model", "items", "path", "queue_ns")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    model: str
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    path: _containers.RepeatedScalarFieldContainer[str]
    queue_ns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch_id: _Optional[str] = ..., model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., path: _Optional[_Iterable[str]] = ..., queue_ns: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodedBatchRequest(_message.Message):
    __slots__ = ("batch_id", "model", "items", "path", "queue_ns")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    model: str
    items: _containers.RepeatedScalarFieldContainer[bytes]
    path: _containers.RepeatedScalarFieldContainer[str]
    queue_ns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch_id: _Optional[str] = ..., model: _Optional[str] = ..., items: _Optional[_Iterable[bytes]] = ..., path: _Optional[_Iterable[str]] = ..., queue_ns: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("batch_id", "worker_id", "succeeded", "failed", "capacity", "load", "batchers", "batcher_rank", "busy")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    BATCHERS_FIELD_NUMBER: _ClassVar[int]
    BATCHER_RANK_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    worker_id: str
    succeeded: int
    failed: int
    capacity: int
    load: int
    batchers: int
    batcher_rank: int
    busy: bool
    def __init__(self, batch_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., capacity: _Optional[int] = ..., load: _Optional[int] = ..., batchers: _Optional[int] = ..., batcher_rank: _Optional[int] = ..., busy: bool = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "instances", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    instances: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    def __init__(self, name: _Optional[str] = ..., instances: _Optional[_Iterable[str]] = ..., ready: bool = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
