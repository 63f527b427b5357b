"""The command examples of README.md and docs/*.md, as tests/e2e/test_docs.py runs them.

`examples(path)` reads a Markdown file's ```bash and ```python blocks: a bash block gives one Example
per shell command (a command goes on while a quote is open or a line ends with a backslash, as in a
shell), a python block one Example for the whole snippet. `with_ports` rewrites the default ports
(gateway 8000/8001, etcd 2379, NATS 4222) to the test cluster's: the only change made to a command.

What a command must do is read from the doc itself: a command whose comment says `# fails: <status>
<CODE>` must answer that HTTP status and error code; every other one must succeed (HTTP 2xx with no error
object, exit status 0). Commands that cannot run against a local cluster in the test (they need Docker,
Kubernetes, or start the cluster themselves) are listed in NOT_RUN with the reason; a NOT_RUN entry that
no longer matches an example is an error, so the list cannot outlive the docs.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/api.md", "docs/operations.md", "docs/architecture.md", "docs/benchmarks.md", "docs/security.md")

NOT_RUN: dict[str, str] = {
    "./scripts/up": "starts the cluster itself: the test starts it the same way (`unimodel up`, defaults but ports)",
    "./scripts/test": "the test suite itself",
    "UNIMODEL_OTEL_EXPORTER=otlp-grpc": (
        "starts a second cluster that exports to a collector; tests/integration/test_observability.py covers OTLP export"
    ),
    "docker compose": (
        "needs the official images from a registry: scripts/test-containers runs the same compose file under Docker "
        "with stand-ins (tests/containers/compose.test.yml)"
    ),
    "docker build": "builds an image: scripts/test-containers builds deploy/Dockerfile's targets the same way",
    "docker run": "runs an image: tests/containers/test_compose_cluster.py runs `unimodel:0.1.0 --help`",
    ".venv/bin/unimodel credentials compose/secrets": (
        "writes compose/secrets: tests/containers runs `unimodel credentials` into a temporary folder"
    ),
    "export UNIMODEL_API_KEYS=": "the compose cluster's API keys: tests/containers sets its own",
    "kubectl ": "needs a Kubernetes cluster; tests/unit/test_k8s_manifests.py validates the manifests",
    "helm ": "installs Helm charts into a Kubernetes cluster",
    "unimodel router     --nats-url nats://nats:4222": "compose's service hostnames; tests/e2e/test_compose_topology.py runs these commands",
    "unimodel gpu-worker --nats-url nats://nats:4222": "compose's service hostnames; tests/e2e/test_compose_topology.py runs these commands",
    ".venv/bin/python scripts/bench/": "a benchmark: minutes of load that rewrites docs/benchmarks/*.json; its figures are in docs/benchmarks.md",
    "scripts/bench/setup_peers.sh": "installs the benchmark peers (perf_analyzer) for the benchmarks",
    ".venv/bin/python scripts/train_cache_verifier.py": (
        "retrains the shipped cache verifier (minutes: embeds 80,000 texts, then trains); "
        "tests/unit/test_cache_verifier.py checks the shipped model and its features"
    ),
    ".venv/bin/python scripts/train_cache_cross_encoder.py": (
        "trains a cross-encoder for half an hour on 2 cores (a measurement; the cache does not use it yet)"
    ),
    "UNIMODEL_API_KEYS=": "starts a cluster with keys itself: tests/e2e/test_security_up.py runs this command (ports aside)",
    ".venv/bin/python -m pytest tests/integration/test_security_fuzz.py": "the suite runs this test module itself",
    "UNIMODEL_CHAOS_REPORT=": "the chaos suite (minutes of faults under load): ./scripts/test runs tests/chaos itself",
    "cd /tmp/": "a before/after benchmark of two commits, each run from its own git worktree under /tmp (minutes of load)",
}

_FAILS = re.compile(r"#\s*fails:\s*(\d{3})\s+([A-Z_]+)")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    doc: str
    line: int  # 1-based line of the command's first line in the doc
    lang: str  # bash | python
    text: str
    expect_status: int | None = None  # an example documented to fail: its HTTP status ...
    expect_code: str = ""  # ... and error code

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def not_run_reason(self) -> str | None:
        for prefix, reason in NOT_RUN.items():
            if self.text.startswith(prefix):
                return reason
        return None


def _complete(command: str) -> bool:
    if command.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # an open quote: the command goes on
        return False
    return True


def examples(doc: str) -> list[Example]:
    lines = (REPO_ROOT / doc).read_text().splitlines()
    out: list[Example] = []
    lang = None  # inside a fence: its language
    start = 0
    block: list[str] = []
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line)
        if fence and lang is None:
            lang, start, block = fence.group(1), number + 1, []
            continue
        if fence:
            if lang == "python":
                out.append(Example(doc, start, "python", "\n".join(block) + "\n"))
            elif lang == "bash":
                out += _commands(doc, start, block)
            lang = None
            continue
        if lang is not None:
            block.append(line)
    return out


def _commands(doc: str, first_line: int, block: list[str]) -> list[Example]:
    out: list[Example] = []
    pending: list[str] = []
    start = first_line
    for offset, line in enumerate(block):
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = first_line + offset
        pending.append(line)
        command = "\n".join(pending)
        if _complete(command):
            fails = _FAILS.search(command)
            out.append(Example(
                doc, start, "bash", command,
                int(fails.group(1)) if fails else None, fails.group(2) if fails else "",
            ))
            pending = []
    if pending:
        raise ValueError(f"{doc}:{start}: the command never ends (an open quote or a trailing backslash)")
    return out


def yaml_blocks(doc: str) -> list[str]:
    """The ```yaml blocks of a doc (settings files shown to users)."""
    return re.findall(r"^```yaml\n(.*?)^```$", (REPO_ROOT / doc).read_text(), re.M | re.S)


def with_ports(text: str, ports: dict[int, int]) -> str:
    """The example with the default ports replaced by the test cluster's (host names left alone)."""
    def swap(m: re.Match[str]) -> str:
        return f"{m.group(1)}:{ports.get(int(m.group(2)), int(m.group(2)))}"

    return re.sub(r"\b(localhost|127\.0\.0\.1):(\d+)\b", swap, text)


def all_examples() -> list[Example]:
    return [ex for doc in DOCS for ex in examples(doc)]
