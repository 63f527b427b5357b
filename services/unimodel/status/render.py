"""`unimodel status` output: aligned tables (one per section) or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence

from unimodel.status.view import ClusterView


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; trailing spaces stripped."""
    cells = [list(headers), *([("-" if c is None else str(c)) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def uptime(started_unix_ms: int, now_ms: int) -> str:
    if started_unix_ms <= 0:
        return "-"
    s = max(0, (now_ms - started_unix_ms) // 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_text(view: ClusterView, now_ms: int) -> str:
    n, m = len(view.services), len(view.models)
    lines = [f"etcd {view.etcd}: {n} instance{'s' * (n != 1)}, {m} registered model{'s' * (m != 1)}", ""]
    lines.append("SERVICES")
    lines += table(
        ("KIND", "ID", "GRPC", "HOST", "PID", "VERSION", "UP", "HEALTH"),
        [
            (s.kind, s.id, s.grpc_address, s.host, s.pid or "-", s.version, uptime(s.started_unix_ms, now_ms), s.health)
            for s in view.services
        ],
    )
    lines += ["", "WORKERS"]
    rows: list[tuple[object, ...]] = []
    for w in view.workers:
        first = (w.id, w.kind, ",".join(w.engines) or "-", w.outstanding)
        if not w.models:
            rows.append((*first, "-", "-", "-", "-", "-"))
        for i, hosted in enumerate(w.models):
            state = hosted.state + (" (pinned)" if hosted.pinned else "") + (f": {hosted.error}" if hosted.error else "")
            lead = first if i == 0 else ("", "", "", "")
            rows.append((*lead, hosted.name, hosted.engine or "-", state, hosted.inflight, hosted.concurrency))
    lines += table(("ID", "KIND", "ENGINES", "OUTSTANDING", "MODEL", "ENGINE", "STATE", "INFLIGHT", "CONCURRENCY"), rows)
    lines += ["", "MODELS"]
    lines += table(
        ("NAME", "ENGINE", "VERSION", "MAX_BATCH", "REPLICAS", "READY ON", "LOADING ON", "FAILED ON"),
        [
            (m.name, m.engine, m.version or "-", m.max_batch_size, m.replicas or "-",
             ",".join(m.ready_on) or "-", ",".join(m.loading_on) or "-", ",".join(m.failed_on) or "-")
            for m in view.models
        ],
    )
    lines += ["", "QUEUES"]
    lines += table(
        ("BATCHER", "MODEL", "QUEUED", "INFLIGHT", "MAX_INFLIGHT", "MAX_BATCH", "MAX_DELAY_MS", "MAX_QUEUE", "POLICY"),
        [
            (q.batcher, q.model, q.queued, q.inflight_batches, q.max_inflight_batches, q.max_batch_size,
             f"{q.max_queue_delay_ms:g}", q.max_queue_size, "model" if q.registered else "default")
            for q in view.queues
        ],
    )
    lines.append("")
    if view.problems:
        lines.append(f"PROBLEMS ({len(view.problems)})")
        lines += [f"  {p}" for p in view.problems]
    else:
        lines.append("healthy: every service registered and serving, every registered model READY")
    return "\n".join(lines)


def render_json(view: ClusterView) -> str:
    return json.dumps(view.to_json(), indent=2)
