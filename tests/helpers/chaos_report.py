"""The chaos suite's measurements: one row per (fault, load), written as JSON and rendered as a table.

Rows are merged by id into the report file, so running a part of the suite updates its rows only. The file
goes to $UNIMODEL_CHAOS_REPORT when set (docs/benchmarks/reliability.json for the published numbers),
else to .cache/chaos/reliability.json (a plain `./scripts/test` run leaves the repository as it was).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from helpers.chaos_load import Load, PerfAnalyzerLoad, summarize

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPORT = REPO_ROOT / ".cache" / "chaos" / "reliability.json"

TARGETS = {
    "zero_lost": "no request without an answer by its deadline",
    "zero_failed": "no accepted non-streaming request failed (a single worker, batcher or router killed; another replica exists)",
    "streams_complete": "every stream completes with the exact greedy text (migration; another worker exists)",
}


@dataclass
class Row:
    id: str
    fault: str
    load: str
    stats: dict = field(default_factory=dict)
    targets: dict[str, bool] = field(default_factory=dict)  # target -> met
    asserted: list[str] = field(default_factory=list)  # what the test asserts (fails ./scripts/test when broken)
    notes: str = ""
    skipped: str = ""  # why the fault was not produced

    def doc(self) -> dict:
        out: dict = {"fault": self.fault, "load": self.load}
        if self.skipped:
            out["skipped"] = self.skipped
        else:
            out.update(self.stats)
            out["targets"] = {k: self.targets[k] for k in sorted(self.targets)}
            out["asserted"] = sorted(self.asserted)
        if self.notes:
            out["notes"] = self.notes
        out["measured_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


class Report:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, Row] = {}
        self.started = time.monotonic()

    @classmethod
    def from_env(cls) -> Report:
        chosen = os.environ.get("UNIMODEL_CHAOS_REPORT", "")
        return cls(Path(chosen) if chosen else DEFAULT_REPORT)

    def command(self) -> str:
        argv = ["python -m pytest", *sys.argv[1:]] if "pytest" in sys.argv[0] else sys.argv
        chosen = os.environ.get("UNIMODEL_CHAOS_REPORT", "")
        return " ".join([f"UNIMODEL_CHAOS_REPORT={chosen}"] * bool(chosen) + argv)

    def add(self, row: Row) -> Row:
        self.rows[row.id] = row
        self.write()  # after every row: a failing assertion later still leaves the measurement
        return row

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            old = {}
        rows = dict(old.get("rows", {}))
        rows.update({k: r.doc() for k, r in self.rows.items()})
        doc = {
            "about": "tests/chaos: faults injected under load into a local cluster (tests/helpers/chaos_cluster.py); "
            "per fault and load: requests sent (in flight at the fault or sent after it), succeeded, failed with a "
            "clear error, dropped (connection broken by a dying gateway), failed unclearly, lost (no answer by the "
            "deadline), p99 latency of the requests sent while the fault lasted",
            "command": self.command(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "suite_seconds": round(time.monotonic() - self.started, 1),
            "targets": TARGETS,
            "rows": {k: rows[k] for k in sorted(rows)},
        }
        self.path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def run_fault(
    loads: list[Load | PerfAnalyzerLoad],
    inject: Callable[[], None],
    recover: Callable[[], None],
    *,
    warm_s: float = 1.5,
    hold_s: float = 4.0,
    tail_s: float = 1.0,
) -> tuple[dict[str, dict], float, float]:
    """Start `loads`, let them run `warm_s`, `inject()`, hold the fault `hold_s`, `recover()` (restarts what
    the fault stopped; returns once the cluster is whole again), run `tail_s` more, stop the loads (waiting for their requests in flight).
    Returns each load's summary, the fault's time and the recovery's."""
    for load in loads:
        load.__enter__()
    try:
        time.sleep(warm_s)
        fault_at = time.monotonic()
        try:
            inject()
            time.sleep(hold_s)
        finally:
            recovering_at = time.monotonic()
            recover()
        recovered_at = time.monotonic()
        time.sleep(tail_s)
    finally:
        for load in loads:
            load.stop()
    return {load.name: summarize(load.results, fault_at, recovering_at, recovered_at) for load in loads}, fault_at, recovered_at


def render_table(doc: dict) -> str:
    """The rows as a Markdown table (docs/benchmarks.md)."""
    head = [
        "fault", "load", "sent", "ok", "failed (clear error)", "dropped", "failed (unclear)", "lost",
        "not ok: sent before / after recovery began", "p99 during fault (ms)", "baseline p99 (ms)", "targets",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]

    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    for row in doc["rows"].values():
        if "skipped" in row:
            lines.append(f"| {row['fault']} | {row['load']} | skipped: {row['skipped']} |" + " |" * (len(head) - 3))
            continue
        targets = ", ".join(f"{k} {'met' if v else '**not met**'}" for k, v in row["targets"].items()) or "-"
        values = [
            row["fault"], row["load"], row["sent"], row["succeeded"], row["failed_clear"], row["dropped"],
            row["failed_unclear"], row["lost"], f"{row['not_ok_sent_before_recovery']} / {row['not_ok_sent_during_recovery']}",
            row["p99_ms_during_fault"], row["baseline_p99_ms"], targets,
        ]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # PYTHONPATH=tests python -m helpers.chaos_report [report.json]: the table
    print(render_table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_REPORT).read_text())))
