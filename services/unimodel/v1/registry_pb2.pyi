from unimodel.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceInfo(_message.Message):
    __slots__ = ("id", "kind", "version", "host", "grpc_address", "nats_subject", "models", "started_unix_ms", "labels", "engines", "model_states", "pid")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NATS_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    version: str
    host: str
    grpc_address: str
    nats_subject: str
    models: _containers.RepeatedScalarFieldContainer[str]
    started_unix_ms: int
    labels: _containers.ScalarMap[str, str]
    engines: _containers.RepeatedScalarFieldContainer[str]
    model_states: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    pid: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., version: _Optional[str] = ..., host: _Optional[str] = ..., grpc_address: _Optional[str] = ..., nats_subject: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., started_unix_ms: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., engines: _Optional[_Iterable[str]] = ..., model_states: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., pid: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "error", "inflight", "pinned", "concurrency", "engine")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ModelStatus.State]
        LOADING: _ClassVar[ModelStatus.State]
        READY: _ClassVar[ModelStatus.State]
        FAILED: _ClassVar[ModelStatus.State]
        UNLOADING: _ClassVar[ModelStatus.State]
    STATE_UNSPECIFIED: ModelStatus.State
    LOADING: ModelStatus.State
    READY: ModelStatus.State
    FAILED: ModelStatus.State
    UNLOADING: ModelStatus.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelStatus.State
    error: str
    inflight: int
    pinned: bool
    concurrency: int
    engine: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelStatus.State, str]] = ..., error: _Optional[str] = ..., inflight: _Optional[int] = ..., pinned: bool = ..., concurrency: _Optional[int] = ..., engine: _Optional[str] = ...) -> None: ...

class ModelCommand(_message.Message):
    __slots__ = ("load", "unload")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    load: _model_pb2.ModelConfig
    unload: str
    def __init__(self, load: _Optional[_Union[_model_pb2.ModelConfig, _Mapping]] = ..., unload: _Optional[str] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("worker_id", "model", "sequences")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    sequences: int
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., sequences: _Optional[int] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("router_id", "workers", "suspended_s", "loads", "batchers")
    class SuspendedSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_S_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    BATCHERS_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    workers: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    suspended_s: _containers.ScalarMap[str, float]
    loads: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    batchers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, router_id: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ..., suspended_s: _Optional[_Mapping[str, float]] = ..., loads: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., batchers: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerSuspected(_message.Message):
    __slots__ = ("worker_id", "reporter", "for_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    FOR_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reporter: str
    for_s: float
    def __init__(self, worker_id: _Optional[str] = ..., reporter: _Optional[str] = ..., for_s: _Optional[float] = ...) -> None: ...
