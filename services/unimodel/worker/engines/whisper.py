"""The ``whisper`` engine: speech to text on CTranslate2 (the engine faster-whisper runs on), float16 on CUDA when
CTranslate2 sees a GPU; on the CPU int8 where its int8 kernels keep Whisper's accuracy, else float32
(cpu_compute_type).

A request is one predict value, a struct:
    {"audio": "<base64 of a WAV / FLAC / MP3 / OGG file>", "task": "transcribe" | "translate",
     "language": "en" (absent: detected), "prompt": "previous text or spellings", "temperature": 0.0}
and its answer
    {"text": "...", "language": "en", "duration": 4.2,
     "segments": [{"id": 0, "start": 0.0, "end": 4.1, "text": "..."}]}
The gateway's OpenAI audio routes (gateway/openai/audio.py) build these values from multipart uploads.

Batching: the batcher hands the engine every request of a batch in one `infer_values` call, and the engine
runs them as ONE CTranslate2 `generate` over all their 30-second windows (a long file is cut into windows of
at most 30 s, in its pauses: whisper_audio.cuts, which join the batch like short clips). A window Whisper
takes for silence gives no text (no_speech_prob > 0.6 and mean log-probability < -1, Whisper's thresholds). On
a CPU the encoder's cost is per window (3,000 frames, whatever the speech in it), so short clips are also
packed: clips of at most `options.pack_seconds` (default 10; 0 = off) from the same tenant that name their
language share a window, `options.pack_gap_seconds` (default 1.5) of silence apart, and each timestamped
segment goes back to the clip whose span holds it. A segment that spans two clips or none sends those clips
through again, each alone in its window; so does a clip that got no segment. Clips of different tenants never
share a window (their words never share a decoding).

Options (ModelConfig.options): `max_audio_seconds` (default 600: longer is 413), `beam_size` (default 1,
greedy), `intra_threads` (CTranslate2 threads; default: the CPUs this process may use),
`compute_type` (default: float16 on CUDA, cpu_compute_type on the CPU), `pack_seconds`, `pack_gap_seconds`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from unimodel.core import errors
from unimodel.v1 import model_pb2
from unimodel.worker import audio
from unimodel.worker.engines import whisper_audio as wa
from unimodel.worker.engines.engine import Engine, engine_option

TASKS = ("transcribe", "translate")
MAX_LENGTH = 448  # Whisper's decoder positions
MAX_PROMPT_TOKENS = MAX_LENGTH // 2 - 1  # as OpenAI's whisper: the prompt keeps the last 223 tokens
FIELDS = frozenset({"audio", "task", "language", "prompt", "temperature"})
NO_SPEECH = 0.6  # Whisper's no_speech_threshold ...
LOW_LOGPROB = -1.0  # ... and logprob_threshold (the mean log-probability of the window's tokens)


def cpu_compute_type(cpuinfo: str) -> str:
    """The default CTranslate2 compute type on this CPU, from /proc/cpuinfo's text: int8 where CTranslate2's int8
    GEMM keeps Whisper's accuracy, float32 elsewhere.

    CTranslate2 multiplies int8 matrices with Intel MKL on Intel CPUs and with oneDNN on the others. On an AMD
    EPYC with AVX2 and no VNNI (oneDNN's u8s8 kernel, which sums pairs of products in 16 bits), whisper-base
    in int8 had 16.9 % word errors on tests/data/speech's English clips against 12.4 % in float32 and lost the
    French clip's first word, at the same speed (8 clips in one batch: 2.86 s int8, 2.93 s float32). int8 on the
    machine of docs/benchmarks.md's first figures (its CPU not recorded) gave 12.4 %; MKL's int8 on an Intel CPU
    was not measured on its own. VNNI (avx512_vnni, avx_vnni) sums u8 x s8 products in 32 bits. So: int8 on Intel
    CPUs and on CPUs with VNNI; float32 on other x86 CPUs; int8 where the text names neither (another
    architecture: CTranslate2's own CPU default)."""
    vendor, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if vendor == "GenuineIntel" or flags & {"avx512_vnni", "avx_vnni"}:
        return "int8"
    return "float32" if vendor or "sse2" in flags else "int8"


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@dataclass
class Clip:
    """One request, decoded and checked."""

    samples: np.ndarray
    task: str
    language: str | None
    prompt: str
    temperature: float
    tenant: str

    @property
    def seconds(self) -> float:
        return len(self.samples) / wa.RATE


@dataclass
class Job:
    """One window to generate: its features, prompt settings, and what it holds."""

    features: np.ndarray
    placed: list[wa.Placed]
    offset: float  # the window's start in its clip (a long clip's later windows)
    language: str = ""
    tokens: list[int] | None = None

    @property
    def first(self) -> int:
        """The window's first clip: its settings (language, task, prompt, temperature) are the window's."""
        return self.placed[0].clip


class WhisperEngine(Engine):
    kind = "whisper"
    takes_values = True

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.max_seconds = engine_option(config, "max_audio_seconds", float, 600.0, positive=True)
        self.beam_size = engine_option(config, "beam_size", int, 1, minimum=1)
        self.threads = engine_option(config, "intra_threads", int, 0, minimum=0)
        self.compute_type = engine_option(config, "compute_type", str, "")
        self.pack_seconds = engine_option(config, "pack_seconds", float, 10.0, minimum=0)
        self.gap_seconds = engine_option(config, "pack_gap_seconds", float, 1.5, minimum=0.2)
        if self.pack_seconds > wa.WINDOW_SECONDS - self.gap_seconds:
            raise errors.InvalidArgument(f"model {config.name!r}: options.pack_seconds must be at most {wa.WINDOW_SECONDS - self.gap_seconds:g}")
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()  # one generate at a time: CTranslate2's threads are the parallelism

    @property
    def concurrency(self) -> int:
        return 1

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        import ctranslate2
        from tokenizers import Tokenizer

        folder = self.config.path
        if not folder or not os.path.isfile(os.path.join(folder, "model.bin")):
            raise errors.FailedPrecondition(f"model {self.model!r}: no CTranslate2 model.bin in its folder")
        cuda = self.config.execution_provider != "cpu" and ctranslate2.get_cuda_device_count() > 0
        if self.config.execution_provider == "cuda" and not cuda:
            raise errors.FailedPrecondition(f"model {self.model!r}: execution_provider cuda, but CTranslate2 sees no GPU")
        device = "cuda" if cuda else "cpu"
        threads = self.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        compute = self.compute_type or ("float16" if cuda else cpu_compute_type(_read_cpuinfo()))
        try:
            self._model = ctranslate2.models.Whisper(folder, device=device, compute_type=compute, intra_threads=threads)
            self._tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        except (RuntimeError, ValueError, OSError) as exc:
            raise errors.FailedPrecondition(f"model {self.model!r}: cannot load the CTranslate2 model: {exc}") from None
        token = self._tokenizer.token_to_id
        self.sot, self.eot = token("<|startoftranscript|>"), token("<|endoftext|>")
        self.no_timestamps, self.prev = token("<|notimestamps|>"), token("<|startofprev|>")
        if None in (self.sot, self.eot, self.no_timestamps, self.prev):
            raise errors.FailedPrecondition(f"model {self.model!r}: tokenizer.json lacks Whisper's special tokens")
        self.timestamp_begin = self.no_timestamps + 1
        self.task_tokens = {task: token(f"<|{task}|>") for task in TASKS}
        self.languages = {
            tok[2:-2]: tid
            for tok, tid in self._tokenizer.get_vocab(with_added_tokens=True).items()
            if tok.startswith("<|")
            and tok.endswith("|>")
            and 2 <= len(tok) - 4 <= 3
            and tok[2:-2].isalpha()
            and tid > self.eot
            and tok[2:-2] not in TASKS
        }

    async def unload(self) -> None:
        self._model = None

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """KServe v2: `audio` BYTES [batch, 1], each an audio file, -> `text` BYTES [batch, 1]. The rows may be
        different callers' (the runner joins requests into one tensor), so they are not packed together."""
        rows = inputs.get("audio")
        if rows is None:
            raise errors.InvalidArgument(f"model {self.model!r}: input 'audio' (BYTES, an audio file per row) is required", field="audio")
        requests: list[tuple[bytes, dict[str, Any]] | errors.UnimodelError] = [(_as_bytes(row), {}) for row in rows.reshape(len(rows), -1)[:, 0]]
        loop = asyncio.get_running_loop()
        async with self._lock:
            answers = await loop.run_in_executor(None, self._run, requests, [str(i) for i in range(len(requests))])
        for answer in answers:
            if isinstance(answer, errors.UnimodelError):
                raise answer
        texts = np.array([[a.struct_value["text"].encode()] for a in answers], dtype=object)
        return {"text": texts}

    async def infer_values(self, values: Sequence[struct_pb2.Value], tenants: Sequence[str] = ()) -> list[Any]:
        requests: list[tuple[bytes, dict[str, Any]] | errors.UnimodelError] = []
        for value in values:
            try:
                requests.append(_request(value))
            except errors.UnimodelError as exc:
                requests.append(exc)
        loop = asyncio.get_running_loop()
        async with self._lock:
            return await loop.run_in_executor(None, self._run, requests, list(tenants) or [""] * len(values))

    # the batch, on a worker thread ---------------------------------------------------------------------
    def _run(self, requests: Sequence[tuple[bytes, dict[str, Any]] | errors.UnimodelError], tenants: list[str]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        clips: dict[int, Clip] = {}
        for i, request in enumerate(requests):
            try:
                if isinstance(request, errors.UnimodelError):
                    raise request
                clips[i] = self._clip(*request, tenants[i])
            except errors.UnimodelError as exc:
                results[i] = exc
        if not clips:
            return results
        order = list(clips)
        groups = wa.pack(
            [clips[i].seconds for i in order],
            self.pack_seconds,
            self.gap_seconds,
            [_pack_group(i, clips[i]) for i in order],
        )
        jobs: list[Job] = []
        for group in groups:
            jobs.extend(self._jobs([order[g] for g in group], clips))
        self._generate(jobs, clips)
        found: dict[int, list[tuple[float, float, list[int]]]] = {i: [] for i in clips}
        alone: set[int] = set()
        for job in jobs:
            assert job.tokens is not None
            parts = wa.segments(job.tokens, self.timestamp_begin, self.eot)
            if len(job.placed) == 1 and job.placed[0].start == 0:  # a window of one clip
                only = job.placed[0].clip
                found[only].extend((s.start + job.offset, s.end + job.offset, s.tokens) for s in parts)
                continue
            tolerance = self.gap_seconds / 2
            heard: set[int] = set()
            for s in parts:
                p = wa.owner(s, job.placed, tolerance)
                if p is None:
                    alone.update(x.clip for x in job.placed)
                    break
                heard.add(p.clip)
                found[p.clip].append((max(s.start - p.start, 0.0), min(s.end, p.end) - p.start, s.tokens))
            alone.update(x.clip for x in job.placed if x.clip not in heard)
        retry: list[Job] = []
        if alone:  # again, each alone in its window(s)
            for i in sorted(alone):
                found[i] = []
                retry.extend(self._jobs([i], clips))
            self._generate(retry, clips)
            for job in retry:
                assert job.tokens is not None
                found[job.placed[0].clip].extend(
                    (s.start + job.offset, s.end + job.offset, s.tokens) for s in wa.segments(job.tokens, self.timestamp_begin, self.eot)
                )
        languages = {p.clip: job.language for job in jobs + retry for p in job.placed}
        for i, clip in clips.items():
            results[i] = self._answer(clip, found[i], languages.get(i, clip.language or ""))
        return results

    def _clip(self, content: bytes, data: dict[str, Any], tenant: str) -> Clip:
        task = data.get("task", "transcribe")
        if task not in TASKS:
            raise errors.InvalidArgument(f'"task" must be one of {", ".join(TASKS)}', field="task")
        language = data.get("language") or None
        if language is not None:
            if not isinstance(language, str) or language.lower() not in self.languages:
                raise errors.InvalidArgument(f'"language" {str(language)[:20]!r} is not one this model knows (ISO-639-1, e.g. en)', field="language")
            language = language.lower()
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise errors.InvalidArgument('"prompt" must be a string', field="prompt")
        temperature = data.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
            raise errors.InvalidArgument('"temperature" must be a number within 0..1', field="temperature")
        samples = audio.decode(content, wa.RATE, self.max_seconds, field="file")
        return Clip(samples, task, language, prompt, float(temperature), tenant)

    def _jobs(self, members: list[int], clips: dict[int, Clip]) -> list[Job]:
        """The windows of one packing group: one shared window of short clips, or a clip's own windows."""
        if len(members) == 1:
            clip = clips[members[0]]
            return [Job(piece.features, [wa.Placed(members[0], 0.0, piece.seconds)], piece.start) for piece in wa.windows(clip.samples)]
        window = np.zeros(wa.WINDOW_SAMPLES, dtype=np.float32)
        placed: list[wa.Placed] = []
        at = 0.0
        for i in members:
            samples = clips[i].samples
            first = int(round(at * wa.RATE))
            window[first : first + len(samples)] = samples
            placed.append(wa.Placed(i, at, at + len(samples) / wa.RATE))
            at += len(samples) / wa.RATE + self.gap_seconds
        return [Job(wa.window_features(window), placed, 0.0)]

    def _prompt(self, clip: Clip, language: str) -> list[int]:
        tokens: list[int] = []
        if clip.prompt:
            text = self._tokenizer.encode(" " + clip.prompt.strip(), add_special_tokens=False).ids
            tokens = [self.prev, *text[-MAX_PROMPT_TOKENS:]]
        return [*tokens, self.sot, self.languages[language], self.task_tokens[clip.task]]

    def _generate(self, jobs: list[Job], clips: dict[int, Clip]) -> None:
        """Detect languages where not given, then one generate per temperature over all windows."""
        import ctranslate2

        if not jobs:
            return
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack([j.features for j in jobs])))
        need = [k for k, j in enumerate(jobs) if clips[j.first].language is None]
        if need:
            detect = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack([jobs[k].features for k in need])))
            for k, found in zip(need, self._model.detect_language(detect), strict=True):
                jobs[k].language = found[0][0][2:-2]
        for job in jobs:
            job.language = clips[job.first].language or job.language or "en"
        by_temperature: dict[float, list[int]] = {}
        for k, job in enumerate(jobs):
            by_temperature.setdefault(clips[job.first].temperature, []).append(k)
        for temperature, ks in by_temperature.items():
            view = (
                features
                if len(ks) == len(jobs)
                else ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack([jobs[k].features for k in ks])))
            )
            prompts = [self._prompt(clips[jobs[k].first], jobs[k].language) for k in ks]
            sampling = {"sampling_temperature": temperature, "sampling_topk": 0} if temperature > 0 else {}
            results = self._model.generate(
                view,
                prompts,
                beam_size=1 if temperature > 0 else self.beam_size,
                max_length=MAX_LENGTH,
                suppress_blank=True,
                return_scores=True,
                return_no_speech_prob=True,
                **sampling,
            )
            for k, result in zip(ks, results, strict=True):
                # Whisper's own silence rule: a window it thinks holds no speech and whose text it is unsure of
                # is silence (on silence it "hears" "you" or "Thank you.")
                silent = result.no_speech_prob > NO_SPEECH and result.scores[0] < LOW_LOGPROB
                jobs[k].tokens = [] if silent else list(result.sequences_ids[0])

    def _answer(self, clip: Clip, found: list[tuple[float, float, list[int]]], language: str) -> struct_pb2.Value:
        found.sort(key=lambda s: s[0])
        segments = []
        for n, (start, end, tokens) in enumerate(found):
            text = self._tokenizer.decode(tokens)
            segments.append({"id": n, "start": round(start, 2), "end": round(max(end, start), 2), "text": text})
        value = struct_pb2.Value()
        value.struct_value.update(
            {
                "text": "".join(s["text"] for s in segments).strip(),
                "language": language,
                "duration": round(clip.seconds, 3),
                "segments": segments,
            }
        )
        return value


def _request(value: struct_pb2.Value) -> tuple[bytes, dict[str, Any]]:
    """A predict value -> (the audio file's bytes, the other fields)."""
    if value.WhichOneof("kind") != "struct_value":
        raise errors.InvalidArgument('input must be an object {"audio": "<base64 audio file>", ...}', field="input")
    data = json_format.MessageToDict(value.struct_value)
    unknown = set(data) - FIELDS
    if unknown:
        raise errors.InvalidArgument(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(FIELDS))}", field="input")
    raw = data.pop("audio", None)
    if not isinstance(raw, str):
        raise errors.InvalidArgument('"audio" must be the audio file as a base64 string', field="audio")
    try:
        return base64.b64decode(raw, validate=True), data
    except (binascii.Error, ValueError):
        raise errors.InvalidArgument('"audio" is not valid base64', field="audio") from None


def _as_bytes(row: object) -> bytes:
    if isinstance(row, bytes):
        return row
    if isinstance(row, str):
        return row.encode("latin-1", errors="replace")
    raise errors.InvalidArgument("input 'audio' must be BYTES (an audio file per row)", field="audio")


def _pack_group(index: int, clip: Clip) -> str:
    """Clips that may share a window: one tenant's, with the same task, language, prompt and temperature. A clip
    that does not name its language is not packed (a shared window is decoded in one language, and detecting
    each clip's first would cost the encoder pass that packing saves)."""
    if clip.language is None:
        return f"\0alone {index}"
    return f"{clip.tenant}\0{clip.task}\0{clip.language}\0{clip.prompt}\0{clip.temperature}"
