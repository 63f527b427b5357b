"""The cache's vectors in Milvus, through pymilvus's MilvusClient: one code path for Milvus Lite (a local
`.db` file, or the Milvus Lite server `unimodel up` starts) and a standalone or distributed Milvus
(`http://host:19530`, as in compose).

The default index is IVF_FLAT (nlist 128, nprobe 16): Milvus Lite offers FLAT, IVF_FLAT and AUTOINDEX
(= FLAT there); with 100,000 vectors FLAT takes 25 ms a search on one core, IVF_FLAT 3-5 ms
(docs/benchmarks.md). A standalone Milvus can use HNSW (settings.milvus_index).

One collection holds every scope: `id` (the entry id of the scalar store), `scope` (querytext.scope_key)
and the L2-normalised `vector`, searched by inner product (= cosine similarity). Every search filters on
the scope, so an entry of another scope is never a candidate, whatever its similarity.

Blocking calls: the service runs them off the event loop.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from pymilvus import MilvusClient  # for annotations: connect() imports pymilvus when it first connects

log = logging.getLogger("unimodel.cache.vectors")
# pymilvus logs every failed call and reconnect attempt with the gRPC error's details (many lines each);
# this module reports failures itself, as one line, and the callers answer them as errors.
logging.getLogger("pymilvus").setLevel(logging.ERROR)
T = TypeVar("T")

SCOPE_CHARS = 64


class VectorStoreError(Exception):
    """Milvus is unreachable or refused the operation; the message says which."""


class VectorIndex:
    def __init__(
        self, uri: str, collection: str, dim: int, *, token: str = "", index_type: str = "IVF_FLAT",
        nlist: int = 128, nprobe: int = 16, timeout_s: float = 5.0,
    ) -> None:
        self.uri, self.collection, self.dim = uri, collection, dim
        self.token, self.index_type, self.timeout_s = token, index_type, timeout_s
        self.nlist, self.nprobe = nlist, nprobe
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> MilvusClient:
        client = self._client
        if client is None:
            self.connect()
            client = self._client
        return client

    def connect(self) -> None:
        """Connect and make sure the collection exists (idempotent; one thread at a time)."""
        from pymilvus import MilvusClient

        if "://" not in self.uri:  # a local file: pymilvus runs Milvus Lite, whose package warns on import
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                import milvus_lite.server_manager  # noqa: F401  (imported under the filter, so pymilvus finds it loaded and nothing warns)
        with self._lock:
            if self._client is not None:
                return
            try:
                client = MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout_s)
                self._ensure(client)
            except VectorStoreError:
                raise
            except Exception as exc:
                raise VectorStoreError(f"Milvus at {self.uri}: {_short(exc)}") from None
            self._client = client

    def _ensure(self, client: MilvusClient) -> None:
        from pymilvus import DataType, MilvusClient

        if client.has_collection(self.collection):
            described = client.describe_collection(self.collection)
            for field in described.get("fields", []):
                if field.get("name") == "vector":
                    dim = int(field.get("params", {}).get("dim", self.dim))
                    if dim != self.dim:
                        raise VectorStoreError(
                            f"collection {self.collection!r} holds {dim}-dim vectors, the embedding model gives "
                            f"{self.dim} (use another collection name)"
                        )
            client.load_collection(self.collection)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("scope", DataType.VARCHAR, max_length=SCOPE_CHARS)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        index = client.prepare_index_params()
        params = {"nlist": self.nlist} if self.index_type.startswith("IVF") else {}
        index.add_index(field_name="vector", index_type=self.index_type, metric_type="IP", params=params)
        client.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong")
        log.info("created Milvus collection %s (%d dims, %s index)", self.collection, self.dim, self.index_type)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except VectorStoreError:
            raise
        except Exception as exc:
            self.close()  # reconnect on the next call
            raise VectorStoreError(f"Milvus {what} failed: {_short(exc)}") from None

    def insert(self, ids: Sequence[int], scope: str, vectors: np.ndarray) -> None:
        rows = [{"id": int(i), "scope": scope, "vector": v.tolist()} for i, v in zip(ids, vectors, strict=True)]
        self._call("insert", lambda: self.client.insert(self.collection, rows))

    def search(self, scope: str, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """The `limit` nearest entries of `scope`: (id, cosine similarity), best first."""
        return [(int(h["id"]), float(h["distance"])) for h in self._search(scope, vector, limit, [])]

    def search_vectors(self, scope: str, vector: np.ndarray, limit: int) -> list[tuple[int, float, np.ndarray]]:
        """As `search`, with each entry's stored vector (what the verifier compares the query's with)."""
        return [
            (int(h["id"]), float(h["distance"]), np.asarray(h["entity"]["vector"], dtype=np.float32))
            for h in self._search(scope, vector, limit, ["vector"])
        ]

    def _search(self, scope: str, vector: np.ndarray, limit: int, output_fields: list[str]) -> list[dict]:
        result = self._call(
            "search",
            lambda: self.client.search(
                self.collection, data=[vector.tolist()], limit=limit, filter=f'scope == "{scope}"',
                output_fields=output_fields, search_params={"metric_type": "IP", "params": {"nprobe": self.nprobe}},
            ),
        )
        return list(result[0]) if result else []

    def delete(self, ids: Sequence[int]) -> None:
        if ids:
            self._call("delete", lambda: self.client.delete(self.collection, ids=[int(i) for i in ids]))

    def delete_scope(self, scope: str) -> None:
        self._call("delete", lambda: self.client.delete(self.collection, filter=f'scope == "{scope}"'))

    def ping(self) -> None:
        self._call("ping", lambda: self.client.has_collection(self.collection))


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
