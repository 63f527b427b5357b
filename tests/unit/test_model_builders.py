"""Model builders and the prepare mechanics, on the cheap models (onnx.helper; no torch)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from unimodel.core import errors, modelconfig
from unimodel.models import CATALOG, STAMP_FILE, is_prepared, listing
from unimodel.models import __main__ as models_cli
from unimodel.models import prepare as prep
from unimodel.models.common import check_onnx, onnx_ops
from unimodel.models.testmodels import MLP_LAYERS

CHEAP = ("identity", "mlp", "delay")

# The contract table (binding: other components code against these names, datatypes and dims).
CONTRACT = {
    "all-minilm-l6-v2": (
        "onnx",
        [("input_ids", "INT64", [-1]), ("attention_mask", "INT64", [-1])],
        [("embedding", "FP32", [384])],
        "text-embedding",
        64,
    ),
    "efficientnet-lite0": (
        "onnx",
        [("image", "FP32", [3, 224, 224])],
        [("probabilities", "FP32", [1000])],
        "image-classification",
        64,
    ),
    "iris-classifier": (
        "onnx",
        [("features", "FP32", [4])],
        [("label", "INT64", []), ("probabilities", "FP32", [3])],
        "tabular",
        256,
    ),
    "smollm2-135m-instruct": ("llamacpp", [], [], "none", 8),  # generates text: no tensors
    "smollm2-135m-instruct-vllm": ("vllm", [], [], "none", 16),  # the same model as a Hugging Face folder
    "whisper-base": ("whisper", [("audio", "BYTES", [1])], [("text", "BYTES", [1])], "none", 16),  # speech to text (CTranslate2)
    "identity": ("onnx", [("INPUT0", "FP32", [-1])], [("OUTPUT0", "FP32", [-1])], "none", 64),
    "mlp": ("onnx", [("INPUT0", "FP32", [384])], [("OUTPUT0", "FP32", [10])], "none", 64),
    "delay": ("delay", [("INPUT0", "FP32", [-1])], [("OUTPUT0", "FP32", [-1])], "none", 64),
}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _specs(specs) -> list[tuple[str, str, list[int]]]:
    return [(s.name, s.datatype, list(s.dims)) for s in specs]


def test_catalog_matches_the_contract_table() -> None:
    assert list(CATALOG) == list(CONTRACT)
    for name, (engine, inputs, outputs, kind, max_batch) in CONTRACT.items():
        config = CATALOG[name].config()
        assert config.name == name
        assert config.engine == engine
        assert _specs(config.inputs) == inputs
        assert _specs(config.outputs) == outputs
        assert config.processing.kind == kind
        assert config.max_batch_size == max_batch
        # the embedding model runs its small rows on two one-thread sessions (models/text.py)
        assert config.instance_count == (2 if name == "all-minilm-l6-v2" else 1)
        assert config.execution_provider == "auto"
        assert config.batching.max_queue_delay_ms == (5.0 if name in ("delay", "whisper-base") else 1.0)
        assert config.file == {"onnx": "model.onnx", "llamacpp": "model.gguf", "whisper": "model.bin"}.get(engine, "")


def test_only_the_vllm_model_is_opt_in() -> None:
    """Prepared only on request (its engine runs from a venv of its own): `prepare` with no names skips it."""
    from unimodel.models.prepare import select

    assert [n for n, spec in CATALOG.items() if not spec.default] == ["smollm2-135m-instruct-vllm"]
    assert [s.name for s in select(None)] == [n for n in CATALOG if n != "smollm2-135m-instruct-vllm"]
    assert [s.name for s in select(["smollm2-135m-instruct-vllm"])] == ["smollm2-135m-instruct-vllm"]
    vllm = CATALOG["smollm2-135m-instruct-vllm"].config()
    assert vllm.llm.context_length == 2048 and vllm.llm.max_sequences == 16
    assert dict(vllm.options) == {"enforce_eager": "1", "kv_cache_memory_gib": "1", "dtype": "float32"}


def test_processing_options() -> None:
    text = CATALOG["all-minilm-l6-v2"].config().processing.options
    assert dict(text) == {"tokenizer": "tokenizer.json", "max_length": "256"}
    image = CATALOG["efficientnet-lite0"].config().processing.options
    assert image["labels"] == "labels.txt" and image["size"] == "224" and image["top_k"] == "5"
    # EfficientNet-Lite: (pixel - 127) / 128, on the 0..1 scale
    assert [float(v) for v in image["mean"].split(",")] == pytest.approx([127 / 255] * 3, abs=1e-6)
    assert [float(v) for v in image["std"].split(",")] == pytest.approx([128 / 255] * 3, abs=1e-6)
    assert CATALOG["iris-classifier"].config().processing.options["labels"] == "labels.txt"
    assert dict(CATALOG["delay"].config().options) == {"delay_ms": "50"}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_every_config_validates_and_round_trips(name: str, tmp_path: Path) -> None:
    config = CATALOG[name].config()
    modelconfig.validate(config)
    assert modelconfig.parse(modelconfig.to_dict(config)) == config
    modelconfig.write(tmp_path / name, config)
    loaded = modelconfig.load(tmp_path / name)
    assert loaded.path == str((tmp_path / name).resolve())
    loaded.ClearField("path")
    assert loaded == config


def test_identity_runs_in_onnxruntime(tmp_path: Path) -> None:
    CATALOG["identity"].build(tmp_path)
    check_onnx(tmp_path, CATALOG["identity"].config())
    session = _session(tmp_path / "model.onnx")
    for shape in ((1, 1), (3, 5), (64, 17)):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        (y,) = session.run(["OUTPUT0"], {"INPUT0": x})
        assert y.dtype == np.float32 and np.array_equal(x, y)


def test_mlp_runs_and_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    CATALOG["mlp"].build(a)
    CATALOG["mlp"].build(b)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    check_onnx(a, CATALOG["mlp"].config())
    assert onnx_ops(a / "model.onnx") == {"Gemm": 3, "Relu": 2}

    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a / "model.onnx")).graph.initializer}
    assert [weights[f"w{i}"].shape for i in range(3)] == list(itertools.pairwise(MLP_LAYERS))
    assert all(w.dtype == np.float32 for w in weights.values())
    session = _session(a / "model.onnx")
    for batch in (1, 7, 64):
        x = np.random.default_rng(batch).standard_normal((batch, 384)).astype(np.float32)
        (y,) = session.run(None, {"INPUT0": x})
        ref = x
        for i in range(3):
            ref = ref @ weights[f"w{i}"] + weights[f"b{i}"]
            if i < 2:
                ref = np.maximum(ref, 0)
        assert y.shape == (batch, 10) and y.dtype == np.float32
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_check_onnx_catches_a_config_that_drifted(tmp_path: Path) -> None:
    CATALOG["mlp"].build(tmp_path)
    config = CATALOG["mlp"].config()
    config.outputs[0].dims[:] = [11]
    with pytest.raises(errors.Internal, match="OUTPUT0"):
        check_onnx(tmp_path, config)
    config = CATALOG["mlp"].config()
    config.inputs[0].datatype = "FP16"
    with pytest.raises(errors.Internal, match="FP16"):
        check_onnx(tmp_path, config)


def _prepare(repo: Path, *names: str, force: bool = False) -> tuple[prep.Report, list[str]]:
    lines: list[str] = []
    report = prep.prepare(repo, list(names), force=force, out=lines.append)
    return report, lines


def test_prepare_builds_stamps_then_skips(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    report, lines = _prepare(repo, *CHEAP)
    assert report.names("built") == list(CHEAP)
    assert lines[0] == "[1/3] identity: building ..."
    assert lines[1].startswith("[1/3] identity: done in ") and lines[1].endswith(" s")
    for name in CHEAP:
        folder = repo / name
        stamp = json.loads((folder / STAMP_FILE).read_text())
        assert stamp["name"] == name and stamp["recipe"] == CATALOG[name].recipe
        assert modelconfig.load(folder).name == name
        assert is_prepared(repo, CATALOG[name])
    assert not (repo / "delay" / "model.onnx").exists()
    assert sorted(p.name for p in repo.iterdir()) == [".prepare.lock", *sorted(CHEAP)]

    report, lines = _prepare(repo, *CHEAP)
    assert report.names("skipped") == list(CHEAP)
    assert lines[:3] == [f"[{i}/3] {n}: skipped (already prepared)" for i, n in enumerate(CHEAP, 1)]
    assert lines[3].startswith("0 built, 3 skipped in ")

    before = json.loads((repo / "mlp" / STAMP_FILE).read_text())["prepared_unix_ms"]
    report, _ = _prepare(repo, "mlp", force=True)
    assert report.names("built") == ["mlp"]
    assert json.loads((repo / "mlp" / STAMP_FILE).read_text())["prepared_unix_ms"] >= before
    assert sorted(p.name for p in repo.iterdir()) == [".prepare.lock", *sorted(CHEAP)]


def test_folder_without_stamp_or_with_an_old_recipe_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _prepare(repo, "identity", "mlp")
    (repo / "identity" / STAMP_FILE).unlink()
    (repo / "identity" / "junk.bin").write_bytes(b"half written")
    report, lines = _prepare(repo, "identity", "mlp")
    assert report.names("built") == ["identity"] and report.names("skipped") == ["mlp"]
    assert not (repo / "identity" / "junk.bin").exists()
    assert is_prepared(repo, CATALOG["identity"])

    monkeypatch.setitem(prep.CATALOG, "mlp", dataclasses.replace(CATALOG["mlp"], recipe=CATALOG["mlp"].recipe + "-next"))
    assert not is_prepared(repo, prep.CATALOG["mlp"])
    report, _ = _prepare(repo, "mlp")
    assert report.names("built") == ["mlp"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"

    def broken(folder: Path) -> None:
        (folder / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(prep.CATALOG, "identity", dataclasses.replace(CATALOG["identity"], build=broken))
    with pytest.raises(RuntimeError, match="exporter crashed"):
        _prepare(repo, "identity")
    assert sorted(p.name for p in repo.iterdir()) == [".prepare.lock"]


def test_interrupted_run_is_cleaned_up_and_rebuilt(tmp_path: Path) -> None:
    """A process killed mid-build leaves only a hidden temp folder, which the next run removes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    script = textwrap.dedent(
        f"""
        import dataclasses, os
        from pathlib import Path
        from unimodel.models import prepare as prep

        def dies(folder):
            (folder / "model.onnx").write_bytes(b"partial")
            os._exit(9)  # like SIGKILL: no cleanup runs

        spec = dataclasses.replace(prep.CATALOG["identity"], build=dies)
        prep.build_one(Path({str(repo)!r}), spec)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in repo.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".identity.tmp-")
    assert not is_prepared(repo, CATALOG["identity"])

    report, lines = _prepare(repo, "identity")
    assert lines[0].startswith("removed 1 unfinished build folder(s)") and leftovers[0] in lines[0]
    assert report.names("built") == ["identity"]
    assert sorted(p.name for p in repo.iterdir()) == [".prepare.lock", "identity"]


def test_missing_package_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = dataclasses.replace(CATALOG["identity"], requires=(("unimodel_no_such_module", "no-such-dist"),))
    monkeypatch.setitem(prep.CATALOG, "identity", spec)
    rc = models_cli.main(["prepare", "--repository", str(tmp_path / "repo"), "--only", "identity"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1
    assert "'no-such-dist'" in err and "identity" in err and "pip install -e '.[models]'" in err
    assert not (tmp_path / "repo" / "identity").exists()


def test_missing_package_does_not_matter_for_prepared_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _prepare(repo, "identity")
    spec = dataclasses.replace(CATALOG["identity"], requires=(("unimodel_no_such_module", "no-such-dist"),))
    monkeypatch.setitem(prep.CATALOG, "identity", spec)
    report, _ = _prepare(repo, "identity")
    assert report.names("skipped") == ["identity"]


def test_cli_unknown_model_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert models_cli.main(["prepare", "--repository", str(repo), "--only", "nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
    assert models_cli.main(["prepare", "--repository", str(repo), "--only", "delay"]) == 0
    capsys.readouterr()
    assert models_cli.main(["list", "--repository", str(repo)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"repository: {repo}"
    rows = {line.split()[0]: line for line in out[1:]}
    assert list(rows) == list(CATALOG)
    assert "  prepared" in rows["delay"] and "not prepared" in rows["mlp"]
    assert "in: INPUT0 FP32 [384]  out: OUTPUT0 FP32 [10]" in rows["mlp"]
    assert "in: features FP32 [4]  out: label INT64 [], probabilities FP32 [3]" in rows["iris-classifier"]
    assert [r.prepared for r in listing(repo)] == [n == "delay" for n in CATALOG]


def test_default_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("UNIMODEL_MODEL_REPOSITORY", raising=False)
    assert prep.default_repository() == Path(".unimodel/models")
    monkeypatch.setenv("UNIMODEL_MODEL_REPOSITORY", str(tmp_path))
    assert prep.default_repository() == tmp_path


def test_importing_the_package_imports_no_heavy_library() -> None:
    code = (
        "import sys, unimodel.models, unimodel.models.__main__, unimodel.cli\n"
        "heavy = [m for m in ('torch', 'onnx', 'sklearn', 'skl2onnx', 'transformers', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
