"""ONNX Runtime engine: `instance_count` InferenceSessions, each run in a thread of the model's own
executor, never on the event loop (session.run releases the GIL).

Providers: CUDAExecutionProvider when `execution_provider` is "cuda", or "auto" and onnxruntime has
it; CPUExecutionProvider otherwise (and always as the fallback). Engine options (ModelConfig.options):
  intra_op_threads   threads per session for one operator (0 = onnxruntime's default: one per core)
  allow_spinning     "1" lets idle session threads spin for work (lower latency, burns CPU the other
                     services on the host need); default "0"
  row_by_row         "1" runs each row of a batch as a run of its own, cut to its own length (the
                     trailing positions its `attention_mask` input marks as padding), and stacks the
                     results (outputs padded with zeros to the longest along their other axes). For text
                     models with int8 weights: onnxruntime quantizes their activations per run, so in a
                     padded batch a text's vector would depend on its batch-mates (cosine 0.987-0.993 to
                     itself alone, all-MiniLM-L6-v2), and on CPU unpadded single rows are also faster
                     (1,330 against 860 texts/s at batch 32, 2 threads). Default "0"
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from unimodel.core import errors, modelconfig
from unimodel.core.tensors import ONNX_TYPES
from unimodel.v1 import model_pb2
from unimodel.worker.engines.engine import Engine, engine_option

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers_for(execution_provider: str, available: Sequence[str] | None = None) -> list[str]:
    """The provider list for a config's `execution_provider` ("auto" | "cuda" | "cpu")."""
    available = list(ort.get_available_providers()) if available is None else list(available)
    if execution_provider == "cuda":
        if CUDA not in available:
            raise errors.FailedPrecondition(
                f"execution_provider is cuda but onnxruntime has no {CUDA} here (available: {', '.join(available)})"
            )
        return [CUDA, CPU]
    if execution_provider == "auto" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def check_signature(config: model_pb2.ModelConfig, session: Any) -> None:
    """The session's inputs and outputs agree with the config (names, datatypes, ranks)."""
    batch_dim = 1 if config.max_batch_size > 0 else 0
    where = f"model {config.name!r} ({config.file})"
    have_in = {i.name: i for i in session.get_inputs()}
    have_out = {o.name: o for o in session.get_outputs()}
    for kind, specs, have in (("input", config.inputs, have_in), ("output", config.outputs, have_out)):
        for spec in specs:
            node = have.get(spec.name)
            if node is None:
                raise errors.FailedPrecondition(
                    f"{where}: config {kind} {spec.name!r} is not in the model (it has {', '.join(sorted(have))})"
                )
            datatype = ONNX_TYPES.get(node.type, node.type)
            if datatype != spec.datatype:
                raise errors.FailedPrecondition(
                    f"{where}: {kind} {spec.name!r} is {datatype} in the model, {spec.datatype} in the config"
                )
            rank = len(node.shape) if node.shape is not None else None
            if rank is not None and rank != len(spec.dims) + batch_dim:
                raise errors.FailedPrecondition(
                    f"{where}: {kind} {spec.name!r} has rank {rank} in the model, the config means "
                    f"{len(spec.dims) + batch_dim} (dims {list(spec.dims)}"
                    f"{' plus the batch dimension' if batch_dim else ''})"
                )
    missing = set(have_in) - {s.name for s in config.inputs}
    if missing:
        raise errors.FailedPrecondition(f"{where}: model inputs {', '.join(sorted(missing))} are not in the config")


class OnnxEngine(Engine):
    kind = "onnx"

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.file = modelconfig.model_file(config, config.file or "model.onnx", "file")
        self.instances = max(1, config.instance_count)
        self.intra_op_threads = engine_option(config, "intra_op_threads", int, 0, minimum=0)
        self.allow_spinning = config.options.get("allow_spinning", "0") == "1"
        self.row_by_row = engine_option(config, "row_by_row", int, 0, minimum=0) == 1
        self.providers: list[str] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sessions: asyncio.Queue[Any] | None = None

    def _create_session(self) -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if self.intra_op_threads:
            so.intra_op_num_threads = self.intra_op_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        so.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.file), sess_options=so, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind error types
            raise errors.FailedPrecondition(f"model {self.model!r}: cannot load {self.file}: {_one_line(exc)}") from None

    @property
    def concurrency(self) -> int:
        return self.instances  # one batch per session at a time

    async def load(self) -> None:
        if not self.file.is_file():
            raise errors.FailedPrecondition(f"model {self.model!r}: {self.file} does not exist")
        self.providers = providers_for(self.config.execution_provider)
        loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.instances, thread_name_prefix=f"onnx-{self.model}")
        try:
            sessions = await asyncio.gather(
                *(loop.run_in_executor(self._executor, self._create_session) for _ in range(self.instances))
            )
            check_signature(self.config, sessions[0])
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._sessions = asyncio.Queue(self.instances)
        for s in sessions:
            self._sessions.put_nowait(s)

    async def unload(self) -> None:
        self._sessions = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        sessions, executor = self._sessions, self._executor
        if sessions is None or executor is None:
            raise errors.Unavailable(f"model {self.model!r} is not loaded", retry_after_s=1)
        names = list(outputs)
        session = await sessions.get()
        try:
            run = run_rows if self.row_by_row else _run
            result = await asyncio.get_running_loop().run_in_executor(executor, run, session, names, inputs)
        finally:
            sessions.put_nowait(session)
        return dict(zip(names, result, strict=True))


def _run(session: Any, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, inputs)
    except Exception as exc:
        text = _one_line(exc)
        if "INVALID_ARGUMENT" in text:
            raise errors.InvalidArgument(f"onnxruntime: {text}") from None
        raise errors.Internal(f"onnxruntime: {text}") from None


def run_rows(session: Any, names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`_run` on each row alone, cut to its real length, the results stacked (row_by_row)."""
    mask = inputs.get("attention_mask")
    rows = next(iter(inputs.values())).shape[0] if inputs else 0
    per_row: list[list[np.ndarray]] = []
    width = mask.shape[1] if mask is not None and mask.ndim == 2 else -1
    for i in range(rows):
        length = int(mask[i].sum()) if mask is not None and width > 0 else 0
        feeds = {name: _row(arr, i, length, width) for name, arr in inputs.items()}
        per_row.append(_run(session, names, feeds))
    return [_stack([row[k] for row in per_row]) for k in range(len(names))]


def _row(arr: np.ndarray, i: int, length: int, width: int) -> np.ndarray:
    """Row i of an input; a [batch, sequence] one (as wide as the mask) cut to the row's `length`."""
    if length and arr.ndim >= 2 and arr.shape[1] == width:
        return arr[i : i + 1, :length]
    return arr[i : i + 1]


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of one output, zero-padded to the largest along the axes after the first, concatenated."""
    if not parts:
        return np.zeros((0,), dtype=np.float32)
    shape = tuple(max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim))
    if all(p.shape[1:] == shape for p in parts):
        return np.concatenate(parts)
    out = np.zeros((sum(p.shape[0] for p in parts), *shape), dtype=parts[0].dtype)
    at = 0
    for p in parts:
        out[(slice(at, at + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
        at += p.shape[0]
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
