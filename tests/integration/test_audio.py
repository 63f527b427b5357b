"""Speech to text end to end: whisper-base on the whisper engine (CTranslate2) in one gpu-worker, behind the
gateway, batcher and router (real nats-server and etcd). The clips are espeak-ng's (tests/data/speech,
scripts/make_speech_samples.py): the openai SDK's transcriptions.create returns their sentences within 15 %
word error rate; concurrent uploads share batches; every response_format; the predict API and KServe v2
infer (REST and gRPC, with tritonclient); and bad uploads get OpenAI-shaped 400 / 413 / 415 answers, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from helpers.speech import ENGLISH, SENTENCES, SPEECH, word_errors
from helpers.support import metric_total, one_worker_cluster

MODEL = "whisper-base"
pytestmark = pytest.mark.timeout(300)


class Cluster:
    def __init__(self, url: str, grpc_port: int, metrics_port: int) -> None:
        self.url, self.grpc_port, self.metrics_port = url, grpc_port, metrics_port

    def batches(self) -> float:
        return metric_total(f"http://127.0.0.1:{self.metrics_port}/metrics", "unimodel_worker_batches_total", model=MODEL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    with one_worker_cluster(tmp_path_factory.mktemp("audio"), model_repository, [MODEL]) as (services, metrics):
        yield Cluster(services.url, services.grpc_port, metrics)


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_sdk_transcribes_espeak_clips_within_15_percent_word_error_rate(cluster: Cluster) -> None:
    errors = total = 0
    for name in ENGLISH:
        with open(SPEECH / name, "rb") as f:
            result = client(cluster).audio.transcriptions.create(model=MODEL, file=f)
        e, n = word_errors(SENTENCES[name]["text"], result.text)
        errors, total = errors + e, total + n
    assert errors / total <= 0.15, f"word error rate {errors / total:.3f} over {len(ENGLISH)} clips"


def test_concurrent_uploads_share_batches_and_keep_their_own_text(cluster: Cluster) -> None:
    async def one(http: httpx.AsyncClient, name: str) -> str:
        files = {"file": (name, (SPEECH / name).read_bytes(), "audio/wav")}
        r = await http.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL, "language": "en"}, files=files)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, name) for name in ENGLISH))

    before = cluster.batches()
    texts = asyncio.run(run())
    ran = cluster.batches() - before
    assert ran < len(ENGLISH), f"{len(ENGLISH)} concurrent uploads ran in {ran} batches"
    for name, text in zip(ENGLISH, texts, strict=True):
        e, n = word_errors(SENTENCES[name]["text"], text)
        assert e / n <= 0.35, (name, text)  # its own sentence, not a neighbour's


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
def test_every_response_format(cluster: Cluster, fmt: str) -> None:
    name = ENGLISH[2]
    files = {"file": (name, (SPEECH / name).read_bytes(), "audio/wav")}
    data = {"model": MODEL, "response_format": fmt, "language": "en"}
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data=data, files=files, timeout=120)
    assert r.status_code == 200, r.text
    if fmt == "json":
        assert "meeting" in r.json()["text"].lower() and r.json()["usage"]["type"] == "duration"
    elif fmt == "text":
        assert r.headers["content-type"].startswith("text/plain") and "meeting" in r.text.lower()
    elif fmt == "verbose_json":
        doc = r.json()
        assert doc["language"] == "en" and doc["task"] == "transcribe" and 3.5 < doc["duration"] < 5
        assert doc["segments"] and all(0 <= s["start"] <= s["end"] <= doc["duration"] + 0.5 for s in doc["segments"])
    elif fmt == "srt":
        assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", r.text), r.text
    else:
        assert r.text.startswith("WEBVTT\n\n") and re.search(r"00:00:\d\d\.\d{3} --> 00:00:\d\d\.\d{3}\n\S", r.text), r.text


def test_language_is_detected_and_translation_gives_english(cluster: Cluster) -> None:
    audio = (SPEECH / "fr.wav").read_bytes()
    files = {"file": ("fr.wav", audio, "audio/wav")}
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL, "response_format": "verbose_json"}, files=files, timeout=120)
    assert r.status_code == 200 and r.json()["language"] == "fr", r.text
    assert "bonjour" in r.json()["text"].lower()
    # (the openai SDK marks audio.translations deprecated; the route is OpenAI's)
    r = httpx.post(f"{cluster.url}/v1/audio/translations", data={"model": MODEL}, files=files, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["text"] and "bonjour" not in r.json()["text"].lower(), r.text


def test_a_long_file_is_cut_into_windows_in_its_pauses_and_silence_is_no_text(cluster: Cluster) -> None:
    """The 8 clips one after another with 1 s pauses (44 s): two windows, cut in a pause, every sentence heard."""
    parts = []
    for name in ENGLISH:
        samples, rate = soundfile.read(SPEECH / name, dtype="float32")
        parts += [samples, np.zeros(rate, np.float32)]
    buf = io.BytesIO()
    soundfile.write(buf, np.concatenate(parts), rate, format="WAV")
    files = {"file": ("long.wav", buf.getvalue(), "audio/wav")}
    data = {"model": MODEL, "language": "en", "response_format": "verbose_json"}
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data=data, files=files, timeout=120)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert 43 < doc["duration"] < 45 and doc["segments"][-1]["end"] > 40
    e, n = word_errors(" ".join(SENTENCES[name]["text"] for name in ENGLISH), doc["text"])
    assert e / n <= 0.15, doc["text"]
    silence = io.BytesIO()
    soundfile.write(silence, np.zeros(3 * 16_000, np.float32), 16_000, format="WAV")
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("s.wav", silence.getvalue())}, timeout=120)
    assert r.status_code == 200 and r.json()["text"] == "", r.text  # not Whisper's "you"


def test_clips_in_other_languages_sent_together_keep_their_language(cluster: Cluster) -> None:
    """Without `language`, each clip is detected on its own window: a French clip among English ones stays French."""

    async def one(http: httpx.AsyncClient, name: str) -> dict:
        files = {"file": (name, (SPEECH / name).read_bytes(), "audio/wav")}
        r = await http.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL, "response_format": "verbose_json"}, files=files)
        assert r.status_code == 200, r.text
        return r.json()

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, name) for name in (ENGLISH[0], "fr.wav", ENGLISH[1])))

    first, french, second = asyncio.run(run())
    assert french["language"] == "fr" and "bonjour" in french["text"].lower(), french
    assert first["language"] == second["language"] == "en"
    assert word_errors(SENTENCES[ENGLISH[0]]["text"], first["text"])[0] <= 4, first["text"]


def test_other_formats_and_rates_decode(cluster: Cluster) -> None:
    """FLAC, OGG Vorbis and MP3 (libsndfile, no ffmpeg), stereo at 44.1 kHz: the same words."""
    samples, rate = soundfile.read(SPEECH / ENGLISH[0], dtype="float32")
    import soxr

    stereo = np.stack([soxr.resample(samples, rate, 44_100)] * 2, axis=1)
    for fmt, subtype in (("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        buf = io.BytesIO()
        soundfile.write(buf, stereo, 44_100, format=fmt, subtype=subtype)
        files = {"file": (f"clip.{fmt.lower()}", buf.getvalue(), "application/octet-stream")}
        r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL, "language": "en"}, files=files, timeout=120)
        assert r.status_code == 200, (fmt, r.text)
        e, n = word_errors(SENTENCES[ENGLISH[0]]["text"], r.json()["text"])
        assert e / n <= 0.35, (fmt, r.json()["text"])


def test_predict_api_and_kserve_infer(cluster: Cluster) -> None:
    audio = (SPEECH / ENGLISH[4]).read_bytes()
    body = {"input": {"audio": base64.b64encode(audio).decode(), "language": "en"}}
    r = httpx.post(f"{cluster.url}/v1/models/{MODEL}:predict", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert "apples" in r.json()["output"]["text"].lower()
    # KServe v2 with tritonclient: the file's bytes as one BYTES element (binary data extension)
    import tritonclient.http as triton

    with triton.InferenceServerClient(cluster.url.removeprefix("http://"), network_timeout=120) as kserve:
        tensor = triton.InferInput("audio", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[audio]], dtype=object), binary_data=True)
        result = kserve.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("text", binary_data=False)])
    text = result.as_numpy("text")
    first = text[0, 0].decode() if isinstance(text[0, 0], bytes) else str(text[0, 0])
    assert text.shape == (1, 1) and "apples" in first.lower(), text
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(f"127.0.0.1:{cluster.grpc_port}") as kserve_grpc:
        tensor = triton_grpc.InferInput("audio", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[audio]], dtype=object))
        answer = kserve_grpc.infer(MODEL, [tensor], client_timeout=120).as_numpy("text")
    assert answer.shape == (1, 1) and b"apples" in answer[0, 0].lower(), answer


def _post(cluster: Cluster, content: bytes, **data: str) -> httpx.Response:
    files = {"file": ("clip.bin", content, "application/octet-stream")}
    return httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL, **data}, files=files, timeout=120)


def test_bad_uploads_get_clear_openai_errors(cluster: Cluster) -> None:
    def check(r: httpx.Response, status: int, needle: str) -> None:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", err

    check(_post(cluster, b""), 400, "empty")
    check(_post(cluster, b"\x00\x01 this is not audio at all " * 20), 415, "WAV, FLAC, MP3")
    wav = (SPEECH / ENGLISH[0]).read_bytes()
    check(_post(cluster, wav[:44] + b"\xff" * 10), 400, "too short")  # a WAV header and 5 samples behind it
    check(_post(cluster, b"fLaC" + bytes(range(256)) * 4), 400, "FLAC file cannot be decoded")
    check(_post(cluster, wav, response_format="xml"), 400, "response_format")
    check(_post(cluster, wav, language="klingon"), 400, "language")
    check(_post(cluster, wav, temperature="hot"), 400, "temperature")
    # over the model's 600 s: 601 s of 8 kHz 8-bit silence (4.8 MB), refused from the header
    long = io.BytesIO()
    soundfile.write(long, np.zeros(601 * 8000, dtype=np.float32), 8000, format="WAV", subtype="PCM_U8")
    check(_post(cluster, long.getvalue()), 413, "600 s")
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": MODEL}, timeout=30)
    check(r, 400, "multipart")
    r = httpx.post(f"{cluster.url}/v1/audio/transcriptions", data={"model": "no-such-model"}, files={"file": ("a.wav", wav)}, timeout=30)
    assert r.status_code == 404, r.text
