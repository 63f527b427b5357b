"""Continuous batching for the llamacpp engine: one llama.cpp context, ``parallel`` sequence slots, one
decode thread (the scheme of llama.cpp's own server with ``--parallel``).

A :class:`SlotDecoder` owns a llama context made with ``n_seq_max = parallel`` and a KV cache of
``context_length x parallel`` cells (``kv_unified`` off, the default: each sequence has its own
``context_length`` cells, so its attention sees the same cell layout whatever runs beside it; on: one
buffer the sequences share). Slot ``i`` is llama.cpp sequence id ``i``. Every step of its thread builds one ``llama_batch``:

- the token each generating sequence sampled last (one token per sequence, logits on);
- then, up to ``n_batch`` tokens in all, the next chunk of the prompts still being evaluated, oldest
  sequence first (logits on a prompt's last token only), so a new sequence's prefill joins the running
  batch instead of waiting for it, and a long prompt is evaluated in chunks between decode steps;

then one ``llama_decode`` and, for every sequence with logits in the batch, one sample with its own
sampler chain (llama-cpp-python's chain: [end-of-generation mask] penalties, top-k, typical, top-p, min-p,
temperature, seeded dist; greedy at temperature 0), whose result goes through the sequence's :class:`Job`
(text, stop strings, counts, deltas). Jobs wait in FIFO order while every slot is taken. A job whose
cancel event is set leaves its slot at the next step (a decode in progress is not interrupted).

KV-cache reuse: a slot keeps the tokens it last evaluated; a new sequence without a seed and not greedy
takes the free slot sharing the longest prefix with its prompt and evaluates only the rest (multi-turn
chat). A seeded or greedy one clears its slot and evaluates the whole prompt, so the same request gives
the same text whatever ran before. A greedy continuation (a generation moved from a lost worker)
evaluates the answer's tokens one per step, as they were evaluated when they were generated.

The thread hands deltas to the event loop with one ``call_soon_threadsafe`` per step for all sequences.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import ctypes
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from unimodel.core import errors
from unimodel.worker.engines import generative
from unimodel.worker.engines.generative import Delta, Prompt

log = logging.getLogger(__name__)

Put = Callable[[Delta | BaseException], None]


class StopScanner:
    """Streams text through stop strings: ``feed`` returns the text that is safe to emit and whether a
    stop string was found (text from it on is dropped); text that could begin a stop string is held
    back until the next piece decides it. ``flush`` returns what is held when the sequence ends."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(frozen=True)
class SamplerSettings:
    """One sequence's sampler chain, resolved from the request and the model's defaults."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    min_tokens: int  # end-of-generation tokens are masked until this many tokens were generated


@dataclass(eq=False)
class Job:
    """One sequence: its prompt, sampler settings, where its deltas go (``put``, called on the event loop
    through ``loop``) and its cancel event. Text state lives here; the decode thread alone touches it."""

    prompt: Prompt
    sampler: SamplerSettings
    loop: asyncio.AbstractEventLoop
    put: Put
    cancel: threading.Event = field(default_factory=threading.Event)
    reuse_cache: bool = True  # may start from a slot's cached prefix (no seed, not greedy)
    one_by_one_from: int = -1  # prompt tokens from this index are evaluated one per step (greedy continuation)
    # text state
    generated: int = 0
    unsent: int = 0
    unsent_ids: list[int] = field(default_factory=list)
    text: str = ""
    decoder: Any = None
    stops: StopScanner | None = None


@dataclass(eq=False)
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache for this sequence id
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    pending_at: int = 0  # index into the prompt of pending[0]
    next_token: int = -1  # sampled, to be evaluated at the next step (-1: none)
    chain: Any = None  # llama_sampler chain
    masked: bool = False  # the chain starts with the end-of-generation mask
    admitted: int = 0  # admission order: prefill goes oldest first
    last_used: int = 0


class SlotDecoder:
    """One llama.cpp context with ``parallel`` sequence slots and the thread that decodes them together
    (see the module doc). ``submit`` and ``stop`` may be called from any thread."""

    def __init__(
        self,
        name: str,
        llama_cpp: Any,
        model: Any,  # llama_cpp._internals.LlamaModel
        *,
        context: int,
        parallel: int,
        n_batch: int,
        n_threads: int,
        kv_unified: bool,
        eog_ids: Sequence[int],
    ) -> None:
        from llama_cpp import _internals

        self.name = name
        self.lib = llama_cpp
        self.model = model
        self.vocab = model.vocab
        self.parallel = parallel
        self.context = context  # per sequence; the penalties look back this far (llama-cpp-python: n_ctx)
        self.n_batch = max(n_batch, parallel)
        self.eog = frozenset(eog_ids)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context * parallel
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = parallel
        params.kv_unified = kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # llama-cpp-python's default
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        bias = (llama_cpp.llama_logit_bias * len(self.eog))()
        for i, t in enumerate(sorted(self.eog)):
            bias[i].token, bias[i].bias = t, -math.inf
        self._eog_bias = bias
        self.n_vocab = model.n_vocab()
        self._piece = (ctypes.c_char * 64)()
        self.slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._admissions = 0
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Put, Delta | BaseException]]] = {}
        self.steps = 0  # decode steps (tests read it)
        self.max_batched = 0  # the most sequences one step generated for (tests read it)
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-{name}", daemon=True)
        self._thread.start()

    # any thread ------------------------------------------------------------------------------------

    @property
    def load(self) -> int:
        """Sequences running or waiting here (for choosing among decoders)."""
        return len(self._waiting) + sum(1 for s in self.slots if s.job is not None)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise errors.Unavailable(f"model {self.name!r} is unloading", retry_after_s=1.0)
            self._waiting.append(job)
            self._cond.notify()

    def wake(self) -> None:
        """A job's cancel event was set: drop it now even if the thread is idle-waiting."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Ends the thread (after the step in progress), fails the jobs left, frees the context."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        for slot in self.slots:
            self._free_chain(slot)
        self.lib.llama_batch_free(self.batch)
        self.ctx.close()

    # the decode thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._busy():
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = self._admit()
                for job in admitted:
                    self._start(job)
                try:
                    self._step()
                finally:
                    self._flush()
        except Exception:
            log.exception("model %s: the decode thread failed", self.name)
            failure: BaseException = errors.Internal(f"model {self.name!r}: the generation failed")
        else:
            failure = errors.Unavailable(f"model {self.name!r} is unloading", retry_after_s=1.0)
        with self._cond:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
        for slot in self.slots:
            if slot.job is not None:
                left.append(slot.job)
                self._release(slot)
        for job in left:
            if not job.cancel.is_set():
                self._send(job, failure)
        self._flush()

    def _busy(self) -> bool:
        return any(s.job is not None for s in self.slots)

    def _admit(self) -> list[Job]:
        """Waiting jobs into free slots, FIFO (the caller holds the condition)."""
        out = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancel.is_set():
                self._waiting.popleft()
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                break
            self._waiting.popleft()
            slot = self._choose(free, job)
            slot.job = job
            self._admissions += 1
            slot.admitted = slot.last_used = self._admissions
            out.append(job)
        return out

    def _choose(self, free: list[_Slot], job: Job) -> _Slot:
        tokens = job.prompt.tokens or []
        if job.reuse_cache:
            best = max(free, key=lambda s: (_common_prefix(s.cached, tokens), -s.last_used))
            if _common_prefix(best.cached, tokens):
                return best
        return min(free, key=lambda s: s.last_used)  # the least recently used: its cache is the least likely wanted

    def _start(self, job: Job) -> None:
        """The slot's KV cache trimmed to what the job reuses, its sampler chain, its text state."""
        slot = next(s for s in self.slots if s.job is job)
        prompt = job.prompt
        tokens = list(prompt.tokens or [])
        job.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        job.stops = StopScanner(prompt.stop)
        if prompt.continued_ids:  # the decoder and the held text as the lost worker had them
            full = "".join(job.decoder.decode(self._detokenize(t)) for t in prompt.continued_ids)
            job.stops.held = generative.held_text(prompt, full)
        if prompt.max_tokens <= 0:  # a continued answer that already has all its tokens
            self._send(job, Delta(text=job.stops.flush(), finish_reason=generative.FINISH_LENGTH))
            self._release(slot)
            return
        keep = min(_common_prefix(slot.cached, tokens), len(tokens) - 1) if job.reuse_cache else 0
        if not self.lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
            keep = 0
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        del slot.cached[keep:]
        slot.pending = tokens[keep:]
        slot.pending_at = keep
        slot.next_token = -1
        slot.masked = job.sampler.min_tokens > 0 and bool(self.eog)
        slot.chain = self._chain(job.sampler, masked=slot.masked)

    def _chain(self, s: SamplerSettings, *, masked: bool) -> Any:
        """llama-cpp-python's chain (Llama._init_sampler), with the end-of-generation mask first."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lib.llama_sampler_chain_add
        if masked:  # removed (index 0) once min_tokens were generated
            add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(self._eog_bias), self._eog_bias))
        add(chain, lib.llama_sampler_init_penalties(self.n_vocab, self.context, 1.0, s.frequency_penalty, s.presence_penalty))
        if s.temperature == 0:
            add(chain, lib.llama_sampler_init_greedy())
        else:
            add(chain, lib.llama_sampler_init_top_k(s.top_k))
            add(chain, lib.llama_sampler_init_typical(1.0, 1))
            add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
            add(chain, lib.llama_sampler_init_min_p(s.min_p, 1))
            add(chain, lib.llama_sampler_init_temp(s.temperature))
            add(chain, lib.llama_sampler_init_dist(s.seed))
        return chain

    def _unmask(self, slot: _Slot) -> None:
        self.lib.llama_sampler_free(self.lib.llama_sampler_chain_remove(slot.chain, 0))
        slot.masked = False

    def _free_chain(self, slot: _Slot) -> None:
        if slot.chain is not None:
            self.lib.llama_sampler_free(slot.chain)
            slot.chain = None

    def _release(self, slot: _Slot) -> None:
        self._free_chain(slot)
        slot.job = None
        slot.pending = []
        slot.next_token = -1

    def _step(self) -> None:
        lib, batch = self.lib, self.batch
        for slot in self.slots:
            if slot.job is not None and slot.job.cancel.is_set():
                self._release(slot)  # its cache stays valid up to what it evaluated
        n = 0
        sample_at: list[tuple[_Slot, int]] = []

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq
            batch.logits[n] = logits
            slot.cached.append(token)
            if logits:
                sample_at.append((slot, n))
            n += 1

        for slot in self.slots:  # one token for every generating sequence
            if slot.job is not None and slot.next_token >= 0:
                add(slot, slot.next_token, True)
                slot.next_token = -1
        generating = n
        for slot in sorted((s for s in self.slots if s.job is not None and s.pending), key=lambda s: s.admitted):
            job = slot.job
            assert job is not None
            room = self.n_batch - n
            if room <= 0:
                break
            take = min(room, len(slot.pending))
            if 0 <= job.one_by_one_from:
                if slot.pending_at >= job.one_by_one_from:
                    take = 1
                else:
                    take = min(take, job.one_by_one_from - slot.pending_at)
            chunk, slot.pending = slot.pending[:take], slot.pending[take:]
            slot.pending_at += take
            for i, token in enumerate(chunk):
                add(slot, token, not slot.pending and i == take - 1)
        if n == 0:
            return
        batch.n_tokens = n
        self.steps += 1
        self.max_batched = max(self.max_batched, generating)
        rc = lib.llama_decode(self.ctx.ctx, batch)
        if rc != 0:
            log.error("model %s: llama_decode returned %d for a batch of %d tokens", self.name, rc, n)
            self._fail_batch(rc)
            return
        for slot, i in sample_at:
            job = slot.job
            assert job is not None
            token = lib.llama_sampler_sample(slot.chain, self.ctx.ctx, i)
            self._on_token(slot, job, int(token))

    def _fail_batch(self, rc: int) -> None:
        """A failed decode: every running sequence fails, their slots are cleared."""
        failure = errors.Internal(f"model {self.name!r}: llama_decode failed ({rc})")
        for slot in self.slots:
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
            slot.cached = []
            if slot.job is not None:
                self._send(slot.job, failure)
                self._release(slot)

    def _on_token(self, slot: _Slot, job: Job, token: int) -> None:
        prompt = job.prompt
        assert job.stops is not None
        finish = ""
        hit = False
        if token in self.eog:  # not counted, like llama-cpp-python's server
            finish = generative.FINISH_STOP
        else:
            job.generated += 1
            job.unsent += 1
            job.unsent_ids.append(token)
            piece, hit = job.stops.feed(job.decoder.decode(self._detokenize(token)))
            job.text += piece
            if hit:
                finish = generative.FINISH_STOP
            elif job.generated >= prompt.max_tokens:
                finish = generative.FINISH_LENGTH
        if not finish:
            if slot.masked and job.generated >= job.sampler.min_tokens:
                self._unmask(slot)
            slot.next_token = token
            if job.text:
                self._send(job, Delta(text=job.text, tokens=job.unsent, token_ids=job.unsent_ids))
                job.text, job.unsent, job.unsent_ids = "", 0, []
            return
        if not hit:  # what was held for a stop that never came (bytes of an unfinished character are dropped)
            job.text += job.stops.flush()
        self._send(
            job,
            Delta(text=job.text, tokens=job.unsent, finish_reason=finish, completion_tokens=job.generated, token_ids=job.unsent_ids),
        )
        self._release(slot)

    def _detokenize(self, token: int) -> bytes:
        """The token's text without special tokens (llama-cpp-python's detokenize of one token)."""
        buf = self._piece
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            big = (ctypes.c_char * -n)()
            n = self.lib.llama_token_to_piece(self.vocab, token, big, -n, 0, False)
            return big.raw[:n]
        return buf.raw[:n]

    def _send(self, job: Job, item: Delta | BaseException) -> None:
        self._outbox.setdefault(job.loop, []).append((job.put, item))

    def _flush(self) -> None:
        """This step's deltas, one call_soon_threadsafe per event loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[Put, Delta | BaseException]]) -> None:
    for put, item in items:
        put(item)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
