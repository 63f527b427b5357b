"""embedding-worker runtime: the worker runtime (worker/service.py) restricted to text-embedding models on
ONNX Runtime (tokenizer from `tokenizers`, no torch). The router places every registered text-embedding
model on the embedding-workers when any is up (router/placement.py), so embeddings for /v1/embeddings and
the cache scale by adding embedding-worker processes; the batcher groups their requests like any other.
"""

from __future__ import annotations

from unimodel.core.kinds import EMBEDDING_WORKER
from unimodel.core.modelconfig import TEXT_EMBEDDING
from unimodel.embedder.settings import EmbedderSettings
from unimodel.v1 import model_pb2, registry_pb2
from unimodel.worker.service import WorkerService

ENGINES = ("onnx",)


class EmbedderService(WorkerService):
    kind = EMBEDDING_WORKER
    settings: EmbedderSettings

    def instance_info(self) -> registry_pb2.InstanceInfo:
        info = super().instance_info()
        engines = [e for e in info.engines if e in ENGINES]
        del info.engines[:]
        info.engines.extend(engines)
        return info

    def refusal(self, config: model_pb2.ModelConfig) -> str:
        if config.processing.kind != TEXT_EMBEDDING or config.engine not in ENGINES:
            return f"{self.id} is an embedding-worker: it hosts text-embedding models on onnx only"
        return super().refusal(config)
