"""What the API families need from the gateway core, as small Protocols (ports).

The API families (``openai/``, ``kserve/``, ``modelcache/``, ``admin/``, ``unified/``) translate a
protocol into calls on the gateway core; each depends only on the ports it uses, never on
:class:`~unimodel.gateway.service.GatewayService` itself. ``app.py`` hands them the service, which
satisfies every port. Plain typing: nothing here runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from google.protobuf import struct_pb2
    from prometheus_client import CollectorRegistry

    from unimodel.core.context import RequestContext
    from unimodel.core.replies import Encoded
    from unimodel.gateway.auth import ApiKeys
    from unimodel.gateway.big_bodies import BodyCodec
    from unimodel.gateway.cache_client import CacheClient
    from unimodel.gateway.catalog import ModelEntry
    from unimodel.gateway.generation_stream import Generation
    from unimodel.gateway.metrics import GatewayMetrics
    from unimodel.gateway.rate_limits import RateLimiter
    from unimodel.gateway.settings import GatewaySettings
    from unimodel.gateway.statistics import ModelStatistics, ReplyTimes, StatsView
    from unimodel.v1 import generate_pb2, inference_pb2, model_pb2


T = TypeVar("T")


class Identity(Protocol):
    """The gateway instance (the first hop of every request's path), its settings and API keys."""

    @property
    def id(self) -> str: ...
    @property
    def settings(self) -> GatewaySettings: ...
    @property
    def auth(self) -> ApiKeys: ...
    @property
    def rate_limiter(self) -> RateLimiter: ...


class ModelView(Protocol):
    """The cluster's models as this gateway sees them (etcd, recomputed on every change)."""

    def models(self) -> dict[str, ModelEntry]: ...
    def configs(self) -> dict[str, model_pb2.ModelConfig]: ...
    def model_ready(self, name: str) -> bool: ...
    def require_ready(self, name: str) -> ModelEntry | None: ...
    def first_seen(self, name: str) -> int: ...
    def readiness(self) -> dict[str, bool]: ...


class AnswerPorts(Protocol):
    """What big bodies need (big_bodies.py): the helper processes, and telling a worker its answer was read."""

    @property
    def body_codec(self) -> BodyCodec: ...

    async def answer_read(self, ref: inference_pb2.BlobRef) -> None: ...


class Predictor(AnswerPorts, Protocol):
    async def predict(
        self, model: str, value: struct_pb2.Value, parameters: dict[str, str], ctx: RequestContext, api: str = "http"
    ) -> inference_pb2.PredictResponse: ...

    async def predict_encoded(
        self, model: str, item: Encoded, ctx: RequestContext, api: str = "http"
    ) -> Encoded | inference_pb2.BlobRef: ...


class TensorInference(AnswerPorts, Protocol):
    @property
    def model_stats(self) -> ModelStatistics: ...

    async def cluster_model_stats(self) -> StatsView: ...

    async def infer(
        self, model: str, item: inference_pb2.BatchItem, ctx: RequestContext, api: str = "http"
    ) -> inference_pb2.InferResponse: ...

    async def infer_encoded(
        self, model: str, item: Encoded, rows: int, ctx: RequestContext,
        render: Callable[[Encoded | inference_pb2.BlobRef], Awaitable[tuple[T, ReplyTimes]]], api: str = "http",
    ) -> T: ...


class Generator(Protocol):
    async def generate(
        self, request: generate_pb2.GenerateRequest, ctx: RequestContext, api: str = "http", tenant: str = ""
    ) -> Generation: ...


class Caching(Protocol):
    """The cache service's client and the gateway's cache metrics."""

    @property
    def cache(self) -> CacheClient: ...
    @property
    def stats(self) -> GatewayMetrics: ...


class Registrar(Protocol):
    async def register_model(self, body: object) -> model_pb2.ModelConfig: ...
    async def unregister_model(self, name: str) -> None: ...


class Metrics(Protocol):
    @property
    def metrics_registry(self) -> CollectorRegistry: ...


# what each API family is handed ----------------------------------------------------------------------
class UnifiedPorts(Identity, ModelView, Predictor, Generator, Protocol):
    """UniModel's own API: :predict (HTTP, gRPC), Generate (gRPC), the model list."""


class OpenAiPorts(Identity, ModelView, Predictor, Generator, Caching, Protocol):
    """Chat, completions (the semantic cache in front) and embeddings (predict on an embedding model)."""


class KServePorts(Identity, ModelView, TensorInference, Protocol):
    """KServe v2 / Triton: infer, metadata, configuration, statistics."""


class ModelCachePorts(Identity, ModelView, Caching, Protocol):
    """ModelCache's API on the cache service."""


class AdminPorts(Identity, ModelView, Registrar, Caching, Protocol):
    """Model registration and status, the cache's hit log."""


class GatewayPorts(UnifiedPorts, OpenAiPorts, KServePorts, ModelCachePorts, AdminPorts, Metrics, Protocol):
    """Everything: what app.py composes the gateway's HTTP and gRPC surface from."""
