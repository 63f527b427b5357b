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
