"""The models a worker hosts: load and unload on command, each model's state, its in-flight batches.

Plain logic (no NATS, no etcd): the service turns commands into calls here and publishes `states()`
in its registration whenever `on_change` fires.

- `load(config)` answers at once (LOADING) and loads in the background; the state becomes READY or
  FAILED(error). The same config again is a no-op; a changed config loads the new version while the
  old one keeps serving (the model stays READY), then swaps and retires the old one.
- `unload(name)` answers at once (UNLOADING): new batches are refused, running ones finish, then the
  engine is freed and the model disappears from the table.
- `acquire(name)` / `release(model)` bracket a batch; `inflight` counts batches running or waiting.
  `admit(name)` is `acquire` for a batch of a model that batches, refused (None) while the model's slots
  are all taken: the batchers share the slots (core/capacity_shares.py), this keeps the limit exact while
  their views differ. `peak` is the most batches a model had in flight at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2, registry_pb2
from unimodel.worker.engines import Engine, create_engine
from unimodel.worker.processors import Processor, make_processor
from unimodel.worker.tensor_batches import Layout

log = logging.getLogger("unimodel.gpu-worker.models")

State = registry_pb2.ModelStatus.State
LOADING, READY, FAILED, UNLOADING = State.LOADING, State.READY, State.FAILED, State.UNLOADING


def builtin_config(name: str) -> model_pb2.ModelConfig:
    """Configs of the models a worker can host with no repository (settings `models`)."""
    if name == "echo":
        return modelconfig.parse({
            "name": "echo",
            "engine": "echo",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "max_batch_size": 64,
        })
    raise errors.InvalidArgument(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")


BUILTIN_MODELS = ("echo",)


def config_key(config: model_pb2.ModelConfig) -> bytes:
    return config.SerializeToString(deterministic=True)


@dataclass(eq=False)
class LoadedModel:
    """One loaded version of a model: what a batch runs on."""

    config: model_pb2.ModelConfig
    engine: Engine
    layout: Layout
    processor: Processor | None  # None when the engine takes predict values as they are
    inflight: int = 0
    peak: int = 0  # the most batches in flight at once
    busy: int = 0  # batches refused because every slot was taken (admit)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(eq=False)
class _Entry:
    name: str
    state: registry_pb2.ModelStatus.State = LOADING
    error: str = ""
    current: LoadedModel | None = None
    target: bytes = b""  # config_key of the config asked for last
    engine: str = ""  # engine of the config asked for last (reported until a version of it is loaded)
    pinned: bool = False
    generation: int = 0  # bumped by every command; a stale background step gives way
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelTable:
    def __init__(
        self,
        on_change: Callable[[], None] = lambda: None,
        *,
        executor: concurrent.futures.Executor | None = None,
        owner: str = "this worker",
        engine_factory: Callable[[model_pb2.ModelConfig], Engine] = create_engine,
        max_concurrent: int = 8,
        upstreams: modelconfig.UpstreamPolicy | None = None,
    ) -> None:
        """`upstreams`: the upstream URLs and key variables an openai-engine model may name here (checked
        again at load: a config in etcd may not have come through a gateway); default none."""
        self.on_change = on_change
        self.max_concurrent = max_concurrent
        self.engine_factory = engine_factory
        self.executor = executor
        self.owner = owner
        self.upstreams = upstreams or modelconfig.UpstreamPolicy(where="this worker")
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # batches ------------------------------------------------------------------------------------
    def acquire(self, name: str) -> LoadedModel:
        """The model to run a batch on, counted in flight until `release`; errors when not READY."""
        entry = self._entries.get(name)
        if entry is None:
            raise errors.NotFound(f"model {name!r} is not loaded on {self.owner}", model=name)
        model = entry.current
        if entry.state != READY or model is None:
            if entry.state == LOADING:
                raise errors.Unavailable(f"model {name!r} is loading on {self.owner}", retry_after_s=1, model=name)
            if entry.state == UNLOADING:
                raise errors.Unavailable(f"model {name!r} is unloading on {self.owner}", retry_after_s=1, model=name)
            raise errors.Unavailable(
                f"model {name!r} failed to load on {self.owner}: {entry.error}", retry_after_s=1, model=name
            )
        model.inflight += 1
        if model.inflight > model.peak:
            model.peak = model.inflight
        model.idle.clear()
        return model

    def admit(self, name: str) -> LoadedModel | None:
        """`acquire` for a batch, or None (the batch is refused, nothing counted) when the model batches and
        its slots are all taken. Models that take one row per batch are always admitted: their batchers keep
        several in flight so that the hops overlap the execution (batcher/service.py `_inflight_cap`), and
        batches of one row lose nothing by waiting here. Generation batches are acked once started."""
        entry = self._entries.get(name)
        model = entry.current if entry is not None else None
        if (
            model is not None and entry is not None and entry.state == READY
            and modelconfig.batch_rows_limit(model.config) > 1 and not model.engine.generative
            and model.inflight >= self.slots(model)
        ):
            model.busy += 1
            return None
        return self.acquire(name)

    def slots(self, model: LoadedModel) -> int:
        """Batches of the model this worker runs at once: the engine's own limit within the worker's."""
        own = model.engine.concurrency
        return min(own, self.max_concurrent) if own > 0 else self.max_concurrent

    def release(self, model: LoadedModel) -> None:
        model.inflight -= 1
        if model.inflight <= 0:
            model.inflight = 0
            model.idle.set()

    # commands -----------------------------------------------------------------------------------
    def load(self, config: model_pb2.ModelConfig, *, pinned: bool = False) -> registry_pb2.ModelStatus:
        """Start loading `config` (validated by the caller); returns the state right now."""
        key = config_key(config)
        entry = self._entries.get(config.name)
        if entry is not None and entry.target == key and entry.state in (LOADING, READY):
            entry.pinned = entry.pinned or pinned
            return self.status(config.name)
        if entry is None:
            entry = self._entries[config.name] = _Entry(config.name)
        entry.target = key
        entry.engine = config.engine
        entry.pinned = entry.pinned or pinned
        entry.generation += 1
        entry.error = ""
        if entry.current is None or entry.state in (UNLOADING, FAILED):
            entry.state = LOADING  # a reload of a READY model keeps it READY (the old version serves)
        self._spawn(self._load(entry, config, entry.generation), f"load {config.name}")
        self.on_change()
        status = self.status(config.name)
        status.state = LOADING  # the command's answer: a load is running
        return status

    def unload(self, name: str) -> registry_pb2.ModelStatus:
        """Start unloading `name`; an unknown name answers a status with no state (nothing hosted)."""
        entry = self._entries.get(name)
        if entry is None:
            return registry_pb2.ModelStatus(name=name)
        entry.generation += 1
        entry.state = UNLOADING
        entry.error = ""
        entry.target = b""
        self._spawn(self._unload(entry, entry.generation), f"unload {name}")
        self.on_change()
        return self.status(name)

    async def load_now(self, config: model_pb2.ModelConfig, *, pinned: bool = False) -> LoadedModel:
        """Load and wait; raises the load's error (used for built-in models at start)."""
        self.load(config, pinned=pinned)
        await self.settle()
        entry = self._entries[config.name]
        if entry.state != READY or entry.current is None:
            raise errors.FailedPrecondition(entry.error or f"model {config.name!r} did not load")
        return entry.current

    async def settle(self) -> None:
        """Wait until no load or unload runs (tests, start-up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # background steps ---------------------------------------------------------------------------
    async def _build(self, config: model_pb2.ModelConfig) -> LoadedModel:
        modelconfig.check_upstream(config, self.upstreams)
        modelconfig.check_files(config)  # and the processors / engines open files through model_file
        engine = self.engine_factory(config)
        layout = Layout.of(config)
        processor = None
        if not engine.takes_values:
            loop = asyncio.get_running_loop()
            processor = await loop.run_in_executor(self.executor, make_processor, config, layout)
        await engine.load()
        return LoadedModel(config, engine, layout, processor)

    async def _load(self, entry: _Entry, config: model_pb2.ModelConfig, generation: int) -> None:
        async with entry.lock:
            if entry.generation != generation:
                return
            try:
                model = await self._build(config)
            except Exception as exc:
                message = exc.message if isinstance(exc, errors.UnimodelError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, errors.UnimodelError):
                    log.warning("loading model %s failed", config.name, exc_info=exc)
                if entry.generation != generation:
                    return
                log.warning("model %s failed to load: %s", config.name, message)
                entry.state, entry.error = FAILED, message
                old, entry.current = entry.current, None
                self.on_change()
                if old is not None:
                    await self._retire(old)
                return
            if entry.generation != generation:  # unloaded or replaced meanwhile
                await self._retire(model)
                return
            old, entry.current = entry.current, model
            entry.state, entry.error = READY, ""
            log.info("model %s ready (%s engine, version %s)", config.name, config.engine, config.version)
            self.on_change()
        if old is not None:
            await self._retire(old)

    async def _unload(self, entry: _Entry, generation: int) -> None:
        async with entry.lock:
            if entry.generation != generation:
                return
            old, entry.current = entry.current, None
            if old is not None:
                await self._retire(old)
            if entry.generation == generation and self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
                log.info("model %s unloaded", entry.name)
                self.on_change()

    async def _retire(self, model: LoadedModel) -> None:
        """Wait for the model's running batches, then free its engine."""
        await model.idle.wait()
        try:
            await model.engine.unload()
        except Exception as exc:
            log.warning("unloading model %s failed: %s", model.name, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %s", name, t.exception(), exc_info=t.exception())

        task.add_done_callback(done)

    # views --------------------------------------------------------------------------------------
    def status(self, name: str) -> registry_pb2.ModelStatus:
        entry = self._entries.get(name)
        if entry is None:
            return registry_pb2.ModelStatus(name=name)
        current = entry.current
        inflight = current.inflight if current is not None else 0
        concurrency = self.slots(current) if current is not None else 0
        return registry_pb2.ModelStatus(
            name=name, state=entry.state, error=entry.error, inflight=inflight, pinned=entry.pinned,
            concurrency=concurrency, engine=current.config.engine if current is not None else entry.engine,
        )

    def states(self) -> list[registry_pb2.ModelStatus]:
        return [self.status(name) for name in sorted(self._entries)]

    def ready(self) -> list[str]:
        return sorted(name for name, e in self._entries.items() if e.state == READY and e.current is not None)

    def not_loaded(self) -> str:
        """"" when every model placed here is READY (one being unloaded no longer counts), else which are
        loading or failed, e.g. "loading: a, b; failed: c"."""
        loading = sorted(n for n, e in self._entries.items() if e.state == LOADING)
        failed = sorted(n for n, e in self._entries.items() if e.state == FAILED)
        parts = [f"{what}: {', '.join(names)}" for what, names in (("loading", loading), ("failed", failed)) if names]
        return "; ".join(parts)

    def pinned(self) -> list[str]:
        return sorted(name for name, e in self._entries.items() if e.pinned)

    def inflight(self) -> tuple[tuple[str, int], ...]:
        return tuple((name, e.current.inflight if e.current else 0) for name, e in sorted(self._entries.items()))

    def get(self, name: str) -> LoadedModel | None:
        entry = self._entries.get(name)
        return entry.current if entry is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    async def close(self) -> None:
        """Stop background steps and free every engine (service stop, after draining)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            if entry.current is not None:
                try:
                    await entry.current.engine.unload()
                except Exception as exc:
                    log.warning("unloading model %s failed: %s", entry.name, exc)
