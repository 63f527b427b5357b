from unimodel.v1 import generate_pb2 as _generate_pb2
from unimodel.v1 import inference_pb2 as _inference_pb2
from unimodel.v1 import registry_pb2 as _registry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListInstancesRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class InstanceState(_message.Message):
    __slots__ = ("info", "outstanding")
    INFO_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    info: _registry_pb2.InstanceInfo
    outstanding: int
    def __init__(self, info: _Optional[_Union[_registry_pb2.InstanceInfo, _Mapping]] = ..., outstanding: _Optional[int] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceState]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceState, _Mapping]]] = ...) -> None: ...

class ListQueuesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class QueueState(_message.Message):
    __slots__ = ("model", "queued", "inflight_batches", "max_inflight_batches", "max_batch_size", "max_queue_delay_ms", "max_queue_size", "registered")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    model: str
    queued: int
    inflight_batches: int
    max_inflight_batches: int
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    registered: bool
    def __init__(self, model: _Optional[str] = ..., queued: _Optional[int] = ..., inflight_batches: _Optional[int] = ..., max_inflight_batches: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., registered: bool = ...) -> None: ...

class ListQueuesResponse(_message.Message):
    __slots__ = ("instance_id", "queues")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    queues: _containers.RepeatedCompositeFieldContainer[QueueState]
    def __init__(self, instance_id: _Optional[str] = ..., queues: _Optional[_Iterable[_Union[QueueState, _Mapping]]] = ...) -> None: ...
