"""Hits gathered between two writes to the scalar store: each hit entry's last access time and hit count
(the LRU order), and the hit log rows. The cache writes them in batches (a flush every flush_interval_s, or
sooner when `flush_rows` rows wait, and at shutdown): one statement per batch instead of one write per
query. Bounded: when the store cannot take them for long, the oldest log rows are dropped and counted.

Plain logic: no I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass, field

from unimodel.cache.store import LogRecord


@dataclass(slots=True)
class Batch:
    touches: dict[int, tuple[float, int]] = field(default_factory=dict)  # entry id -> (last access, hits)
    records: list[LogRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.touches or self.records)


class HitBuffer:
    def __init__(self, flush_rows: int = 1000, max_rows: int = 100_000) -> None:
        self.flush_rows, self.max_rows = flush_rows, max_rows
        self._batch = Batch()
        self.dropped = 0  # log rows dropped because the buffer was full

    def __len__(self) -> int:
        return len(self._batch.records)

    @property
    def due(self) -> bool:
        """Enough rows wait for a flush before the next interval."""
        return len(self._batch.records) >= self.flush_rows or len(self._batch.touches) >= self.flush_rows

    def add(self, record: LogRecord, hit_entry: int | None = None, at: float = 0.0) -> None:
        """A query's log row, and its hit (entry id, at `at`) when it hit."""
        if hit_entry is not None:
            last, n = self._batch.touches.get(hit_entry, (0.0, 0))
            self._batch.touches[hit_entry] = (max(last, at), n + 1)
        self._batch.records.append(record)
        self._trim()

    def take(self) -> Batch:
        """Everything gathered; the buffer starts empty."""
        batch, self._batch = self._batch, Batch()
        return batch

    def put_back(self, batch: Batch) -> None:
        """A batch the store refused goes back in front of what came since (bounded: the oldest go)."""
        for entry_id, (at, n) in batch.touches.items():
            last, m = self._batch.touches.get(entry_id, (0.0, 0))
            self._batch.touches[entry_id] = (max(last, at), n + m)
        self._batch.records[:0] = batch.records
        self._trim()

    def _trim(self) -> None:
        over = len(self._batch.records) - self.max_rows
        if over > 0:
            del self._batch.records[:over]
            self.dropped += over
