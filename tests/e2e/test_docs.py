"""Every command example of README.md and docs/*.md, run unchanged (but for the ports) against a cluster
started the way the README says: `./scripts/up` from the repository root, its defaults but the ports.

Shell commands run in bash with the venv's `unimodel` and `python` first on PATH, in a folder holding the
`photo.jpg` the README's image example reads and the
`speech.wav` its audio examples send. curl's answers are checked through curl's own config file
($CURL_HOME/.curlrc adds a `--write-out` line with the HTTP status), so the commands stay as written.
An example must succeed (HTTP 2xx, no error object, exit status 0) unless its comment says
`# fails: <status> <CODE>`; then it must fail exactly so. tests/helpers/docexamples.py reads the docs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sklearn.datasets

from helpers.docexamples import REPO_ROOT, Example, all_examples, with_ports
from helpers.up_process import ctrl_c, kill_if_running
from unimodel.local.cluster import state_dir_holder
from unimodel.local.procs import free_port, wait_until
from unimodel.models import CATALOG, is_prepared

STATUS = "@@http-status"
RUNNABLE = [ex for ex in all_examples() if ex.not_run_reason() is None]
_ERROR_OBJECT = re.compile(r'(?<!\\)"error"\s*:\s*(\{|"[^"])')  # an error object or message; "error": "" is a field


class ReadmeCluster:
    def __init__(self, http: int, grpc: int, nats: int, etcd: int, workdir: Path) -> None:
        self.ports = {8000: http, 8001: grpc, 4222: nats, 2379: etcd}
        self.base = f"http://127.0.0.1:{http}"
        self.workdir = workdir

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
        env["PATH"] = f"{REPO_ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
        env["CURL_HOME"] = str(self.workdir)  # .curlrc: the status line
        env["UNIMODEL_ETCD_ENDPOINTS"] = f"127.0.0.1:{self.ports[2379]}"  # `unimodel status`'s default, moved
        # the examples run in workdir; `unimodel status` reads the etcd credentials `up` made in its state dir
        env["UNIMODEL_STATE_DIR"] = str(REPO_ROOT / ".unimodel")
        return env


def _seed_models(state: Path, prepared: Path) -> None:
    """The demo models `up` would build into <state>/models, hard-linked from the suite's prepared ones (the
    same recipe): `up` then finds them prepared, as on a user's second start."""
    models = state / "models"
    for spec in CATALOG.values():
        if spec.default and not is_prepared(models, spec):
            shutil.rmtree(models / spec.name, ignore_errors=True)
            shutil.copytree(prepared / spec.name, models / spec.name, copy_function=os.link)


@pytest.fixture(scope="module")
def readme_cluster(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeCluster]:
    state = REPO_ROOT / ".unimodel"  # the default state directory of `./scripts/up`
    holder = state_dir_holder(state)
    if holder is not None:
        pytest.skip(f"`unimodel up` (pid {holder}) holds {state}, the README cluster's state directory")
    _seed_models(state, model_repository)
    workdir = tmp_path_factory.mktemp("readme")
    shutil.copy(Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg", workdir / "photo.jpg")
    shutil.copy(REPO_ROOT / "tests" / "data" / "speech" / "00.wav", workdir / "speech.wav")  # espeak-ng's voice
    (workdir / ".curlrc").write_text(f'write-out = "\\n{STATUS} %{{http_code}}\\n"\n')
    cluster = ReadmeCluster(free_port(), free_port(), free_port(), free_port(), workdir)
    ports = cluster.ports
    log = (workdir / "up.log").open("w+")
    up = subprocess.Popen(
        ["./scripts/up", "--http-port", str(ports[8000]), "--grpc-port", str(ports[8001]),
         "--nats-port", str(ports[4222]), "--etcd-port", str(ports[2379])],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=cluster.env(),
    )
    try:
        wait_until(lambda: "UniModel is up" in Path(log.name).read_text(), 300, "`./scripts/up` to print its endpoints")

        def every_model_ready() -> bool:
            models = httpx.get(f"{cluster.base}/v1/models", timeout=5).json()["data"]
            demo = [name for name, spec in CATALOG.items() if spec.default]  # and the built-in echo
            return len(models) > len(demo) and all(m["ready"] for m in models)

        wait_until(every_model_ready, 300, "every demo model READY")
        yield cluster
        ctrl_c(up, 90)
    finally:
        kill_if_running(up)
        log.close()
        sys.stderr.write(Path(log.name).read_text()[-20000:])
    text = Path(log.name).read_text()
    assert "Traceback" not in text


def _split_status(output: str) -> tuple[list[int], str]:
    statuses = [int(s) for s in re.findall(rf"^{STATUS} (\d+)$", output, re.M)]
    return statuses, re.sub(rf"\n?^{STATUS} \d+$\n?", "\n", output, flags=re.M)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("example", RUNNABLE, ids=[ex.where for ex in RUNNABLE])
def test_doc_example(example: Example, readme_cluster: ReadmeCluster) -> None:
    text = with_ports(example.text, readme_cluster.ports)
    if example.lang == "python":
        script = readme_cluster.workdir / "example.py"
        script.write_text(text)
        argv = [str(REPO_ROOT / ".venv" / "bin" / "python"), str(script)]
    else:
        argv = ["bash", "-o", "pipefail", "-c", text]
    proc = subprocess.run(
        argv, cwd=readme_cluster.workdir, env=readme_cluster.env(), capture_output=True, text=True, timeout=120
    )
    statuses, body = _split_status(proc.stdout)
    shown = f"{example.where}:\n{text}\n--- exit {proc.returncode}, HTTP {statuses}\n{body[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, shown
    if example.expect_status is not None:
        assert statuses == [example.expect_status], shown
        assert example.expect_code in body, shown
        return
    assert proc.returncode == 0, shown
    assert all(200 <= s < 300 for s in statuses), shown
    assert body.strip(), shown
    assert not _ERROR_OBJECT.search(body), shown
    if "text/event-stream" in body or '"stream": true' in text:
        assert "data: [DONE]" in body, shown

