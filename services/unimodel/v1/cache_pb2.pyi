from unimodel.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_VERDICT_UNSPECIFIED: _ClassVar[CacheVerdict]
    CACHE_VERDICT_ACCEPTED: _ClassVar[CacheVerdict]
    CACHE_VERDICT_REJECTED: _ClassVar[CacheVerdict]
CACHE_VERDICT_UNSPECIFIED: CacheVerdict
CACHE_VERDICT_ACCEPTED: CacheVerdict
CACHE_VERDICT_REJECTED: CacheVerdict

class CacheScope(_message.Message):
    __slots__ = ("model", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class CacheQueryRequest(_message.Message):
    __slots__ = ("scope", "messages", "threshold_short", "threshold_long", "exact_only")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SHORT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_LONG_FIELD_NUMBER: _ClassVar[int]
    EXACT_ONLY_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_generate_pb2.ChatMessage]
    threshold_short: float
    threshold_long: float
    exact_only: bool
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_generate_pb2.ChatMessage, _Mapping]]] = ..., threshold_short: _Optional[float] = ..., threshold_long: _Optional[float] = ..., exact_only: bool = ...) -> None: ...

class CacheQueryResponse(_message.Message):
    __slots__ = ("hit", "exact", "similarity", "entry_id", "hit_query", "answer", "embed_ns", "search_ns", "total_ns", "best_similarity", "verdict", "verify_score")
    HIT_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    HIT_QUERY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    EMBED_NS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    BEST_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SCORE_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    exact: bool
    similarity: float
    entry_id: int
    hit_query: str
    answer: str
    embed_ns: int
    search_ns: int
    total_ns: int
    best_similarity: float
    verdict: CacheVerdict
    verify_score: float
    def __init__(self, hit: bool = ..., exact: bool = ..., similarity: _Optional[float] = ..., entry_id: _Optional[int] = ..., hit_query: _Optional[str] = ..., answer: _Optional[str] = ..., embed_ns: _Optional[int] = ..., search_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., best_similarity: _Optional[float] = ..., verdict: _Optional[_Union[CacheVerdict, str]] = ..., verify_score: _Optional[float] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("messages", "answer")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_generate_pb2.ChatMessage]
    answer: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_generate_pb2.ChatMessage, _Mapping]]] = ..., answer: _Optional[str] = ...) -> None: ...

class CacheInsertRequest(_message.Message):
    __slots__ = ("scope", "entries")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    entries: _containers.RepeatedCompositeFieldContainer[CacheEntry]
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[CacheEntry, _Mapping]]] = ...) -> None: ...

class CacheInsertResponse(_message.Message):
    __slots__ = ("ids", "evicted")
    IDS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    evicted: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., evicted: _Optional[int] = ...) -> None: ...

class CacheRemoveRequest(_message.Message):
    __slots__ = ("scope", "truncate", "ids")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    truncate: bool
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., truncate: bool = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CacheRemoveResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class CacheLogRequest(_message.Message):
    __slots__ = ("scope", "limit")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    limit: int
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class CacheLogRecord(_message.Message):
    __slots__ = ("time", "hit", "exact", "similarity", "entry_id", "query", "latency_ms", "model", "verdict", "verify_score")
    TIME_FIELD_NUMBER: _ClassVar[int]
    HIT_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SCORE_FIELD_NUMBER: _ClassVar[int]
    time: float
    hit: bool
    exact: bool
    similarity: float
    entry_id: int
    query: str
    latency_ms: float
    model: str
    verdict: CacheVerdict
    verify_score: float
    def __init__(self, time: _Optional[float] = ..., hit: bool = ..., exact: bool = ..., similarity: _Optional[float] = ..., entry_id: _Optional[int] = ..., query: _Optional[str] = ..., latency_ms: _Optional[float] = ..., model: _Optional[str] = ..., verdict: _Optional[_Union[CacheVerdict, str]] = ..., verify_score: _Optional[float] = ...) -> None: ...

class CacheLogResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[CacheLogRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[CacheLogRecord, _Mapping]]] = ...) -> None: ...
