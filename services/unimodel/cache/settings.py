from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from unimodel.core.settings import CommonSettings, LocalPath, absolute_path, register_settings

RECALL_SHORT, RECALL_LONG = 0.80, 0.75
VERIFY_THRESHOLD, VETO_THRESHOLD = 0.86, 0.5
"""Defaults of the verification stage: the recall floors (similarity), the probability a candidate under the
threshold needs, the probability under which one above it is refused. Chosen on the QQP dev set
(docs/benchmarks.md, cache quality)."""


@register_settings
class CacheSettings(CommonSettings):
    """The semantic cache. Thresholds are cosine similarities of all-MiniLM-L6-v2 embeddings, chosen on
    the evaluation sets in docs/benchmarks.md (cache quality)."""

    service = "cache"

    data_dir: LocalPath = Field(".unimodel/cache", description="folder of the SQLite store (and of Milvus Lite's file)")
    sqlite_path: LocalPath = Field("", description="SQLite file of entries and hit log (default <data-dir>/cache.sqlite)")
    store_url: str = Field(
        "", description="scalar store shared by cache replicas: postgresql://user@host:5432/db (password in "
        "store_password_file); empty = the SQLite file (one replica)",
    )
    store_password: str = Field("", description="PostgreSQL password (prefer store_password_file)")
    store_password_file: LocalPath = Field("", description="file holding the PostgreSQL password")
    store_pool_size: int = Field(10, ge=1, le=1000, description="PostgreSQL connections per cache replica")
    store_connect_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="how long the cache waits at start for PostgreSQL before it gives up"
    )
    store_timeout_s: float = Field(10.0, gt=0, le=600, description="longest PostgreSQL statement of a call without a deadline")
    milvus_uri: str = Field(
        "", description="Milvus: http://host:19530 (standalone / Milvus Lite server) or a .db file for Milvus Lite "
        "in-process (default <data-dir>/milvus.db)",
    )
    milvus_token: str = Field("", description="Milvus token (user:password), if it has auth on")
    milvus_collection: str = Field("unimodel_cache", description="Milvus collection holding the cache vectors")
    milvus_index: str = Field(
        "IVF_FLAT", description="Milvus index type of the vectors (IVF_FLAT, FLAT, AUTOINDEX; HNSW on a standalone Milvus)"
    )
    milvus_nlist: int = Field(128, ge=1, le=65536, description="IVF clusters of the index (when it is IVF_*)")
    milvus_nprobe: int = Field(16, ge=1, le=65536, description="IVF clusters a search visits")
    embedding_model: str = Field("all-minilm-l6-v2", description="text-embedding model the cache embeds with")
    embedding_dim: int = Field(384, ge=1, le=65536, description="dimension of the embedding model's vectors")
    embedding_timeout_s: float = Field(5.0, gt=0, le=600, description="deadline of one embedding call")
    embedding_batch: int = Field(32, ge=1, le=4096, description="texts per embedding request on inserts")
    threshold_short: float = Field(
        0.94, gt=0, le=1, description="similarity at which a candidate is a hit (unless the verifier vetoes it), texts "
        "of <= long_text_chars",
    )
    threshold_long: float = Field(0.87, gt=0, le=1, description="the same, longer texts")
    verify: bool = Field(
        True, description="the verification stage: a model trained on labelled question pairs decides on the "
        "candidates between the recall thresholds and the thresholds, and may veto those above (cache/verifier.py)",
    )
    verify_threshold: float = Field(
        VERIFY_THRESHOLD, ge=0, le=1,
        description="verifier probability a candidate under the threshold needs; 0 = the model's own threshold",
    )
    veto_threshold: float = Field(
        VETO_THRESHOLD, ge=0, le=1, description="verifier probability under which a candidate at or above the threshold "
        "is refused (0: never)",
    )
    verifier_model: LocalPath = Field("", description="verifier ONNX file (default: the one shipped in the package)")
    recall_threshold_short: float = Field(
        RECALL_SHORT, gt=0, le=1, description="similarity a candidate needs to reach the verifier, texts of <= long_text_chars",
    )
    recall_threshold_long: float = Field(
        RECALL_LONG, gt=0, le=1, description="similarity a candidate needs to reach the verifier, longer texts"
    )
    long_text_chars: int = Field(80, ge=1, description="texts longer than this use threshold_long (ModelCache: 256)")
    ambiguity_margin: float = Field(
        0.02, ge=0, le=1, description="a miss when two entries with different answers are within this similarity",
    )
    top_k: int = Field(8, ge=1, le=100, description="nearest entries a query considers")
    guard: bool = Field(True, description="refuse hits whose numbers or negation differ from the query's")
    ttl_s: float = Field(7 * 86400, ge=0, description="entries expire this long after insertion; 0 = never")
    max_entries_per_scope: int = Field(200_000, ge=1, description="entries per scope before LRU eviction")
    max_entries: int = Field(
        2_000_000, ge=1, description="entries in all scopes before LRU eviction (of the inserting tenant's own entries)"
    )
    max_entries_per_tenant: int = Field(
        200_000, ge=1,
        description="entries of one tenant (all its scopes) before LRU eviction of that tenant's own entries; the "
        "shared tenant of open mode and admins is bounded by max_entries only",
    )
    max_answer_bytes: int = Field(256 * 1024, ge=1, description="largest answer stored")
    max_query_chars: int = Field(32 * 1024, ge=1, description="longest query text (all messages)")
    max_insert_entries: int = Field(10_000, ge=1, description="entries in one insert request")
    hit_log_keep: int = Field(100_000, ge=0, description="hit log rows kept (oldest dropped)")
    flush_interval_s: float = Field(0.5, gt=0, le=3600, description="hit log and LRU times are written this often")
    flush_rows: int = Field(1000, ge=1, le=1_000_000, description="hit log rows that trigger a write before the interval")
    hit_buffer_rows: int = Field(
        100_000, ge=1, description="hit log rows kept in memory while the store cannot take them (the oldest are dropped)"
    )
    sweep_interval_s: float = Field(60.0, gt=0, le=86400, description="expired entries are dropped this often")
    reply_margin_s: float = Field(
        0.5, ge=0, le=60,
        description="an insert or removal commits only while this much of the request's deadline is left (its "
        "answer must reach the caller before the caller gives up); later, it is refused with DEADLINE_EXCEEDED "
        "and nothing is stored",
    )
    sqlite_busy_timeout_s: float = Field(
        5.0, gt=0, le=600, description="longest wait for the SQLite write lock of a write without a deadline"
    )

    @field_validator("milvus_uri")
    @classmethod
    def _milvus_uri(cls, v: str) -> str:
        return v if "://" in v else absolute_path(v)  # a Milvus Lite file is a local path

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if not v:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError("store_url must be postgresql://user@host:port/database (or empty for SQLite)")
        if parts.password is not None:
            raise ValueError("store_url holds a password: put it in store_password_file instead")
        return v

    @model_validator(mode="after")
    def _store_password(self) -> CacheSettings:
        if self.store_password and self.store_password_file:
            raise ValueError("store_password and store_password_file are both set; give one")
        if (self.store_password or self.store_password_file) and not self.store_url:
            raise ValueError("store_password needs store_url (the SQLite store has no password)")
        return self

    @property
    def sqlite_file(self) -> Path:
        return Path(self.sqlite_path) if self.sqlite_path else Path(self.data_dir) / "cache.sqlite"

    @property
    def milvus(self) -> str:
        return self.milvus_uri or str(Path(self.data_dir) / "milvus.db")
