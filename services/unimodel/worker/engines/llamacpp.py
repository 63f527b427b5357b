"""The ``llamacpp`` engine: a GGUF model on the CPU with llama-cpp-python, continuous batching.

One model (the weights, loaded once) and ``instance_count`` llama.cpp contexts, each with ``parallel``
sequence slots (default 4) decoded together by one thread (llamacpp_slots.SlotDecoder: one ``llama_decode``
batch per step holds the next token of every running sequence and chunks of the prompts being
evaluated, as llama.cpp's server does with ``--parallel``). The engine's concurrency (what the router
sends it at once) is ``instance_count x parallel``; sequences beyond that wait in FIFO order. Each
context holds ``llm.context_length`` tokens (default 2048) per slot.

- ``prepare`` renders the chat template (``llm.chat_template``, else the GGUF's
  ``tokenizer.chat_template``, with llama-cpp-python's Jinja2ChatFormatter and the model's bos/eos), or
  takes the raw prompt for completions, and tokenizes it once with a vocabulary-only Llama (the rules of
  llama-cpp-python: special tokens parsed, BOS per the GGUF for raw prompts). Inputs up to
  ``INLINE_CHARS`` are tokenized on the event loop (under a millisecond), longer ones in a thread.
- ``generate`` hands the sequence to the least loaded context's decode thread, never running llama.cpp
  on the event loop. Each sequence has its own sampler chain (llama-cpp-python's: penalties, top-k,
  typical, top-p, min-p, temperature, seeded dist; greedy at temperature 0). A slot reuses the KV cache
  of the prompt prefix it shares with its previous sequence (multi-turn chat), except for requests with
  a seed or temperature 0: their whole prompt is evaluated, so that the same request gives the same text
  whatever ran before or beside it (with ``kv_unified`` 0, the default, each slot's cells are its own).
  ``min_tokens`` and ``ignore_eos`` (vLLM's) mask the end-of-generation tokens' logits before sampling
  until that many tokens (all of max_tokens) were generated.
- Text goes to the event loop with one ``call_soon_threadsafe`` per decode step into each sequence's
  queue (at most max_tokens + 1 items). UTF-8 split across tokens is held until complete (a sequence
  that ends inside a character drops its bytes: max_tokens is never exceeded to finish it). Stop strings
  (the request's and the template's) end the sequence and are not returned; text that could be the
  start of one is held back until it cannot. ``completion_tokens`` counts every sampled token but the
  end-of-generation one (like llama-cpp-python's server), the tokens of a stop string included.
- A continuation (GenerateRequest.continuation: the generation moved here from a lost worker) appends the
  answer's token ids to the rendered prompt, so greedy decoding goes on exactly as it would have on the
  lost worker (the answer's tokens are evaluated one per step, as they were generated); the text the
  client did not get yet (held for a possible stop string) is sent first. Every delta carries its token
  ids (Delta.token_ids).
- Leaving the iteration early sets the sequence's cancel event: the decode thread drops it at its next
  step (a decode in progress is not interrupted) and gives its slot to the next sequence; the others
  go on undisturbed.

Engine options (ModelConfig.options): ``parallel`` sequence slots per instance (default 4; 1 = one
sequence at a time), ``kv_unified`` ``0`` (default: each slot has its own ``context_length`` KV cells)
or ``1`` (one buffer the slots share; cell positions then depend on the other sequences, which changes
greedy text in the last bits), ``n_threads`` threads per instance (default: the CPUs this process may
use // instance_count), ``n_batch`` tokens per decode step (default 512), ``top_k`` /
``min_p`` used when a request leaves them unset (defaults 40 and 0.05, llama-cpp-python's),
``extra_buffers`` ``auto`` (default) / ``1`` / ``0``: llama.cpp's extra weight buffer types (AMX, and the
CPU repacks for Q4_0 / IQ4_NL / Q8_0). ``auto`` turns them off when the CPU has AMX: llama.cpp's AMX
matmul crashes the process (SIGSEGV at the first decode) on some Sapphire Rapids hosts, this one
included (llama.cpp issue #20824, still open). On a host whose cores are busy with other processes,
``n_threads`` 1 can be many times faster: llama.cpp's threads meet at a barrier at every layer, and each
one that waits for a core stalls them all.

llama.cpp's own log lines go to the ``unimodel.worker.engines.llamacpp.native`` logger, not to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unimodel.core import errors, generation_rules, modelconfig
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines import generative
from unimodel.worker.engines.engine import engine_option
from unimodel.worker.engines.generative import Delta, GenerativeEngine, Prompt
from unimodel.worker.engines.llamacpp_slots import Job, SamplerSettings, SlotDecoder, StopScanner

__all__ = ["LlamaCppEngine", "StopScanner", "cpu_has_amx", "extra_buffers_wanted", "model_params"]

log = logging.getLogger(__name__)
native_log = logging.getLogger(__name__ + ".native")

DEFAULT_CONTEXT = 2048
DEFAULT_PARALLEL = 4  # sequence slots per instance (llama.cpp's server: --parallel, auto = 4)
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
# Inputs up to this many characters are rendered and tokenized on the event loop (measured: under 1 ms
# for SmolLM2's tokenizer; ~0.7 us a character); longer ones in a thread.
INLINE_CHARS = 1024
_SEED_RANGE = 0xFFFFFFFF  # llama.cpp reads seed 0xFFFFFFFF as "random": seeds map into [0, 0xFFFFFFFF)

# llama-cpp-python redirects the process's stdout/stderr while a model loads: loads are serialised so
# two of them never interleave that redirection.
_LOAD_LOCK = threading.Lock()


def cpu_has_amx(llama_cpp: Any) -> bool:
    """llama.cpp was built with AMX and this CPU has it (its system info says AMX_INT8 = 1)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def extra_buffers_wanted(setting: str, llama_cpp: Any) -> bool:
    """The ``extra_buffers`` option resolved: ``auto`` is on unless the CPU has AMX (see the module doc)."""
    return not cpu_has_amx(llama_cpp) if setting == "auto" else setting == "1"


@contextlib.contextmanager
def model_params(llama_cpp: Any, *, extra_buffers: bool) -> Iterator[None]:
    """Llama() objects built in this block get ``use_extra_bufts = extra_buffers`` (llama-cpp-python's
    constructor has no argument for it: it starts from ``llama_model_default_params()``, which is
    wrapped here). Callers hold ``_LOAD_LOCK``, so no other load sees the wrapper."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


# --- native logs -----------------------------------------------------------------------------------

_native_callback: Any = None
_native_quiet = threading.local()


def _route_native_logs(llama_cpp: Any) -> None:
    """llama.cpp / ggml log lines -> logging (their INFO and DEBUG as DEBUG), once per process.

    ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
    """
    global _native_callback
    if _native_callback is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            lvl = last[0] if level == 5 else levels.get(level, logging.DEBUG)
            last[0] = lvl
            if getattr(_native_quiet, "on", False):
                lvl = logging.DEBUG
            if native_log.isEnabledFor(lvl):
                message = text.decode("utf-8", "replace").rstrip()
                if message:
                    native_log.log(lvl, "%s", message)
        except Exception:
            pass

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _native_callback = callback  # kept alive: llama.cpp holds only the C pointer


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Native warnings expected in this block (the vocabulary-only load) are logged at DEBUG."""
    _native_quiet.on = True
    try:
        yield
    finally:
        _native_quiet.on = False


# --- options ---------------------------------------------------------------------------------------


def seed_for(sampling: generate_pb2.SamplingParams) -> int:
    """The sampler seed: the request's (any int64, mapped into llama.cpp's range), else a random one."""
    if sampling.HasField("seed"):
        return sampling.seed % _SEED_RANGE
    return random.randrange(_SEED_RANGE)


# --- the engine ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    text: str
    tokens: list[int]
    stops: list[str]


class LlamaCppEngine(GenerativeEngine):
    """``LlamaCppEngine(config)``, then ``await load()``; see the module doc."""

    kind = "llamacpp"
    resumes = True

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.context = generative.context_length(config, DEFAULT_CONTEXT)
        self.instance_count = max(1, config.instance_count)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.n_threads = engine_option(config, "n_threads", int, max(1, cpus // self.instance_count), minimum=1)
        self.n_batch = min(self.context, engine_option(config, "n_batch", int, 512, minimum=1))
        self.parallel = engine_option(config, "parallel", int, DEFAULT_PARALLEL, minimum=1)
        if self.parallel > MAX_PARALLEL:
            raise errors.InvalidArgument(f"model {config.name!r}: options.parallel must be <= {MAX_PARALLEL}")
        self.kv_unified = engine_option(config, "kv_unified", bool, False)
        self.default_top_k = engine_option(config, "top_k", int, DEFAULT_TOP_K, minimum=0)
        self.default_min_p = engine_option(config, "min_p", float, DEFAULT_MIN_P, minimum=0.0)
        self.extra_buffers = config.options.get("extra_buffers", "") or "auto"
        if self.extra_buffers not in ("auto", "0", "1"):
            raise errors.InvalidArgument(f"model {config.name!r}: options.extra_buffers must be auto, 0 or 1")
        self._extra_buffers_on = False
        self._decoders: list[SlotDecoder] = []
        self._model: Any = None  # the weights (llama_cpp._internals.LlamaModel), shared by the decoders
        self._vocab: Any = None  # a vocabulary-only Llama: prepare's tokenizer
        self._vocab_lock = threading.Lock()
        self._formatter: Any = None
        self._template_source = "none"
        self._add_bos = False
        self._eog_ids: list[int] = []  # the end-of-generation tokens, masked for min_tokens / ignore_eos
        self._n_vocab = 0
        self._gguf: dict[str, str] = {}

    @property
    def concurrency(self) -> int:
        return self.instance_count * self.parallel

    @property
    def decoders(self) -> list[SlotDecoder]:
        return list(self._decoders)

    def model_path(self) -> Path:
        return modelconfig.model_file(self.config, self.config.file or "model.gguf", "file")

    # lifecycle ------------------------------------------------------------------------------------

    async def load(self) -> None:
        if self._decoders:
            return
        path = self.model_path()
        if not path.is_file():
            raise errors.FailedPrecondition(f"model {self.config.name!r}: no GGUF file at {path}")
        await asyncio.to_thread(self._load_sync, path)

    def _load_sync(self, path: Path) -> None:
        import llama_cpp
        from llama_cpp import _internals

        _route_native_logs(llama_cpp)
        extra = extra_buffers_wanted(self.extra_buffers, llama_cpp)
        if self.extra_buffers == "auto" and not extra:
            log.info("model %s: llama.cpp's extra buffer types (AMX) are off: this CPU has AMX (options.extra_buffers)", self.model)
        vocab = model = None
        decoders: list[SlotDecoder] = []
        try:
            with _LOAD_LOCK, model_params(llama_cpp, extra_buffers=extra):
                with _quiet_native():  # "n_ctx_seq > n_ctx_train (0)": a vocabulary has no context
                    vocab = llama_cpp.Llama(str(path), vocab_only=True, n_ctx=8, verbose=False)
                model = _internals.LlamaModel(
                    path_model=str(path), params=llama_cpp.llama_cpp.llama_model_default_params(), verbose=False
                )
            self._gguf = dict(vocab.metadata)
            formatter = self._chat_formatter(vocab)
            eog_ids = [t for t in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(model.vocab, t)]
            for i in range(self.instance_count):
                decoders.append(
                    SlotDecoder(
                        f"{self.model}-{i}" if self.instance_count > 1 else self.model,
                        llama_cpp,
                        model,
                        context=self.context,
                        parallel=self.parallel,
                        n_batch=self.n_batch,
                        n_threads=self.n_threads,
                        kv_unified=self.kv_unified,
                        eog_ids=eog_ids,
                    )
                )
        except BaseException as exc:
            for decoder in decoders:
                decoder.stop()
            for thing in (model, vocab):
                if thing is not None:
                    thing.close()
            if isinstance(exc, ValueError | RuntimeError):
                raise errors.FailedPrecondition(f"model {self.config.name!r}: cannot load {path}: {exc}") from None
            raise

        trained = int(self._gguf.get(f"{self._gguf.get('general.architecture', '')}.context_length", "0") or 0)
        if trained and self.context > trained:
            log.warning("model %s: context_length %d is over the %d tokens it was trained with", self.model, self.context, trained)
        self._eog_ids = eog_ids
        self._n_vocab = model.n_vocab()
        self._vocab = vocab
        self._model = model
        self._formatter = formatter
        self._template_source = ("config" if self.config.llm.chat_template else "gguf") if formatter else "none"
        self._add_bos = bool(vocab._model.add_bos_token())
        self._extra_buffers_on = extra
        self._decoders = decoders

    def _chat_formatter(self, vocab: Any) -> Any:
        """llama-cpp-python's Jinja2ChatFormatter for the config's template, else the GGUF's (or None)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.config.llm.chat_template or self._gguf.get("tokenizer.chat_template", "")
        if not template:
            return None
        model = vocab._model
        eos, bos = vocab.token_eos(), vocab.token_bos()
        try:
            return Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos] if eos != -1 else None,
            )
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise errors.FailedPrecondition(f"model {self.config.name!r}: the chat template does not compile: {exc}") from None

    async def unload(self) -> None:
        """Stops the decode threads (after their step in progress; running sequences get Unavailable),
        frees the contexts and the model."""
        decoders, self._decoders = self._decoders, []
        vocab, self._vocab = self._vocab, None
        model, self._model = self._model, None
        if decoders or vocab is not None or model is not None:
            await asyncio.to_thread(self._unload_sync, decoders, model, vocab)

    def _unload_sync(self, decoders: list[SlotDecoder], model: Any, vocab: Any) -> None:
        for decoder in decoders:
            decoder.stop()
        if model is not None:
            model.close()
        if vocab is not None:
            with self._vocab_lock:
                vocab.close()

    def metadata(self) -> dict[str, str]:
        out = {
            "context_length": str(self.context),
            "chat_template": self._template_source,
            "instances": str(self.instance_count),
            "parallel": str(self.parallel),
            "kv_unified": "1" if self.kv_unified else "0",
            "n_threads": str(self.n_threads),
            "extra_buffers": "on" if self._extra_buffers_on else "off",
            "file": str(self.model_path()),
        }
        if self._gguf:
            out["tokenizer"] = f"gguf:{self._gguf.get('tokenizer.ggml.model', 'unknown')}"
            arch = self._gguf.get("general.architecture", "")
            out["architecture"] = arch
            if trained := self._gguf.get(f"{arch}.context_length"):
                out["trained_context_length"] = trained
        return out

    # prepare --------------------------------------------------------------------------------------

    async def prepare(self, request: generate_pb2.GenerateRequest, request_id: str) -> Prompt:
        if self._vocab is None:
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        sampling = request.sampling
        generation_rules.validate(request)  # the gateway's rules, again: the worker may be reached directly
        size = len(request.prompt) + sum(len(m.content) + len(m.role) for m in request.messages)
        encoded = await generative.under_lock(self._vocab_lock, lambda: self._encode(request), inline=size <= INLINE_CHARS)
        count = len(encoded.tokens)
        generation_rules.check_prompt_tokens(self.config, count, self.context)
        max_tokens = generation_rules.resolve_max_tokens(self.config, sampling, count, self.context)
        prompt = Prompt(
            request_id=request_id,
            text=encoded.text,
            prompt_tokens=count,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=list(dict.fromkeys(s for s in [*sampling.stop, *encoded.stops] if s)),
            tokens=encoded.tokens,
        )
        if request.HasField("continuation"):
            prompt = generative.continued(prompt, request.continuation, self._n_vocab)
        return prompt

    def _encode(self, request: generate_pb2.GenerateRequest) -> _Encoded:
        """(text, tokens, template stops) — the caller holds the vocabulary lock."""
        if self._vocab is None:  # unloaded meanwhile
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        if not request.messages:
            text = request.prompt
            tokens = self._tokenize(text, add_bos=self._add_bos)
            if not tokens:
                raise errors.InvalidArgument("the prompt is empty", model=self.config.name, field="prompt")
            return _Encoded(text, tokens, [])
        if self._formatter is None:
            raise errors.InvalidArgument(
                f"model {self.config.name!r} has no chat template (none in its GGUF, no llm.chat_template): "
                f"use /v1/completions",
                model=self.config.name, field="messages",
            )
        try:
            result = self._formatter(messages=generative.chat_messages(request))
        except Exception as exc:  # the template's raise_exception (e.g. roles must alternate), jinja errors
            raise errors.InvalidArgument(
                f"the chat template of model {self.config.name!r} refused the conversation: {exc}",
                model=self.config.name, field="messages",
            ) from None
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        # The template writes BOS itself when the model wants one (llama-cpp-python: added_special).
        tokens = self._tokenize(result.prompt, add_bos=not result.added_special)
        return _Encoded(result.prompt, tokens, [s for s in stops if s])

    def _tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """Special tokens parsed, like llama-cpp-python. One llama_tokenize call into a buffer of the
        largest possible size (Llama.tokenize sizes it from the trained context, which a vocabulary-only
        load reports as 0, and so tokenizes everything twice)."""
        import llama_cpp

        data = text.encode("utf-8")
        n_max = len(data) + 2  # a token covers at least one byte; BOS/EOS added around
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab._model.vocab, data, len(data), buf, n_max, add_bos, True)
        if n < 0:  # cannot happen with that size; the library's own path copes if it ever does
            return list(self._vocab.tokenize(data, add_bos=add_bos, special=True))
        return list(buf[:n])

    # generate -------------------------------------------------------------------------------------

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        decoders = self._decoders
        if not decoders:
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        if not prompt.tokens:
            raise errors.Internal(f"model {self.config.name!r}: generate needs a prompt from prepare")
        s = prompt.sampling
        greedy = s.HasField("temperature") and s.temperature == 0
        min_tokens = prompt.max_tokens if s.ignore_eos else min(s.min_tokens, prompt.max_tokens)
        settings = SamplerSettings(
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k or self.default_top_k,
            min_p=self.default_min_p,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            seed=seed_for(s),
            min_tokens=min_tokens,
        )
        out: asyncio.Queue[Delta | BaseException] = asyncio.Queue()  # at most max_tokens + 1 items
        job = Job(
            prompt=prompt,
            sampler=settings,
            loop=asyncio.get_running_loop(),
            put=out.put_nowait,
            # Asked to be reproducible (a seed, or greedy): the whole prompt is evaluated. Reusing a cached
            # prefix re-evaluates only the prompt's last token, whose logits then differ in the last bits,
            # enough to change a seeded sample (and, rarely, a greedy one).
            reuse_cache=not (s.HasField("seed") or greedy),
            one_by_one_from=len(prompt.tokens) - len(prompt.continued_ids) if prompt.continued_ids and greedy else -1,
        )
        decoder = min(decoders, key=lambda d: d.load)
        finished = failed = False
        try:
            decoder.submit(job)
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    failed = True
                    raise item
                if item.finish_reason:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                job.cancel.set()  # the decode thread drops the sequence at its next step
                decoder.wake()
                if not failed:
                    self.aborted += 1
