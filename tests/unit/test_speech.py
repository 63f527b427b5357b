"""Speech to text, the parts without a model: audio decoding and its errors (worker/audio.py), Whisper's
features, packing and segments (worker/engines/whisper_audio.py), the OpenAI response formats
(gateway/openai/audio.py) and the demo model's config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from unimodel.core import errors, modelconfig
from unimodel.gateway.openai import audio as openai_audio
from unimodel.models import whisper as whisper_model
from unimodel.worker import audio
from unimodel.worker.engines import whisper_audio as wa
from unimodel.worker.engines.whisper import cpu_compute_type

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"


def encoded(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


# --- decoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III"), ("AIFF", "PCM_16")]
)
def test_every_accepted_format_decodes_to_16_khz_mono(fmt: str, subtype: str) -> None:
    samples = audio.decode(encoded(tone(2.0, 44_100, channels=2), 44_100, fmt, subtype), 16_000, 60)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 32_000) < 2_000  # MP3 and Vorbis add their encoder delay
    assert 0.15 < float(np.sqrt(np.mean(samples[4000:-4000] ** 2))) < 0.25  # the tone survived the trip


def test_the_espeak_clip_resamples_from_22050() -> None:
    data = (SPEECH / "00.wav").read_bytes()
    info = soundfile.info(io.BytesIO(data))
    samples = audio.decode(data, 16_000, 60)
    assert info.samplerate == 22_050 and len(samples) == pytest.approx(info.frames * 16_000 / 22_050, abs=2)


def test_empty_short_unknown_damaged_and_long_audio_are_clear_errors() -> None:
    with pytest.raises(errors.InvalidArgument, match="empty"):
        audio.decode(b"", 16_000, 60)
    with pytest.raises(errors.InvalidArgument, match="too short"):
        audio.decode(encoded(tone(0.05, 16_000), 16_000), 16_000, 60)
    with pytest.raises(errors.UnsupportedMediaType, match="WAV, FLAC, MP3, OGG") as unknown:
        audio.decode(b"\x00\x00\x00\x20ftypM4A " + bytes(2000), 16_000, 60)  # an M4A (AAC) header
    assert unknown.value.http_status == 415 and unknown.value.metadata["field"] == "file"
    with pytest.raises(errors.InvalidArgument, match="FLAC file cannot be decoded"):
        audio.decode(b"fLaC" + bytes(range(256)) * 4, 16_000, 60)
    with pytest.raises(errors.PayloadTooLarge, match="at most 60 s") as long:
        audio.decode(encoded(np.zeros(61 * 8000, np.float32), 8000, "WAV", "PCM_U8"), 16_000, 60)
    assert long.value.http_status == 413 and long.value.metadata["limit"] == "audio_seconds"


@pytest.mark.parametrize(
    ("head", "name"), [(b"RIFF", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "OGG"), (b"ID3\x04", "MP3"), (b"\xff\xfb\x90", "MP3"), (b"\x00\x00", None)]
)
def test_sniff_names_the_container(head: bytes, name: str | None) -> None:
    assert audio.sniff(head + bytes(8)) == name


# --- features, packing, segments ------------------------------------------------------------------------
def test_mel_filters_are_slaney_triangles() -> None:
    f = wa.mel_filters()
    assert f.shape == (80, 201) and (f >= 0).all()
    assert (f > 0).sum(axis=1).min() >= 1  # no empty band
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # bands in rising frequency


def test_windows_are_30_seconds_of_3000_frames_normalised_like_whisper() -> None:
    one = wa.windows(tone(5.0, 16_000))
    assert len(one) == 1 and one[0].features.shape == (80, 3000) and (one[0].start, one[0].seconds) == (0.0, 5.0)
    features = one[0].features
    assert features.max() - features.min() <= 2.0 + 1e-6  # clamped at 8 decades below the top, divided by 4
    band = int(features[:, 100:400].mean(axis=1).argmax())  # the loudest band during the 440 Hz tone
    centre = wa.mel_filters()[band].argmax() * wa.RATE / wa.N_FFT
    assert 360 <= centre <= 520, centre
    assert len(wa.windows(np.zeros(int(30.5 * 16_000), np.float32))) == 2


def test_long_audio_is_cut_in_its_pauses() -> None:
    """A 50 s tone with a pause at 24-24.5 s: the first window ends in the pause, not at 30 s in a word."""
    x = tone(50.0, 16_000)
    x[24 * 16_000 : int(24.5 * 16_000)] = 0
    pieces = wa.cuts(x)
    assert len(pieces) == 2 and pieces[0][0] == 0 and pieces[-1][1] == len(x) and pieces[0][1] == pieces[1][0]
    assert 24 * 16_000 <= pieces[0][1] <= 24.5 * 16_000, pieces[0][1] / 16_000
    steady = wa.cuts(tone(95.0, 16_000))  # no pause: cuts at most 30 s apart, covering everything
    assert len(steady) == 4 and all(0 < b - a <= 30 * 16_000 for a, b in steady) and steady[-1][1] == 95 * 16_000


def test_pack_fills_windows_per_group_and_leaves_long_clips_alone() -> None:
    groups = wa.pack([5, 5, 5, 5, 5, 20, 5, 5], pack_seconds=10, gap_seconds=1.5, groups=["a"] * 5 + ["a", "b", "b"])
    # group a: 5 clips of 5 s with 1.5 s gaps fill 5 + 4 * 6.5 = 31 s > 28.5: four share a window, the fifth opens one
    assert groups == [[0, 1, 2, 3], [4], [5], [6, 7]]
    assert wa.pack([5, 5], pack_seconds=0, gap_seconds=1.5, groups=["a", "a"]) == [[0], [1]]


def test_segments_read_timestamp_pairs() -> None:
    tb, eot = 50364, 50257
    tokens = [tb + 0, 11, 12, tb + 100, tb + 110, 13, tb + 200, 14]
    got = wa.segments(tokens, tb, eot)
    assert [(s.start, s.end, s.tokens) for s in got] == [(0.0, 2.0, [11, 12]), (2.2, 4.0, [13]), (4.0, 30.0, [14])]
    assert [(s.start, s.end) for s in wa.segments([21, 22, eot], tb, eot)] == [(0.0, 30.0)]


def test_owner_needs_the_segment_inside_one_clip() -> None:
    placed = [wa.Placed(0, 0.0, 5.0), wa.Placed(1, 6.5, 11.0)]
    assert wa.owner(wa.Segment(0.0, 5.4, []), placed, 0.75) is placed[0]
    assert wa.owner(wa.Segment(6.0, 10.8, []), placed, 0.75) is placed[1]
    assert wa.owner(wa.Segment(3.0, 9.0, []), placed, 0.75) is None  # spans both: transcribed alone


# --- response formats -----------------------------------------------------------------------------------
RESULT = {
    "text": "Hello there. General Kenobi.",
    "language": "en",
    "duration": 3725.5,
    "segments": [
        {"id": 0.0, "start": 0.0, "end": 1.5, "text": " Hello there."},
        {"id": 1.0, "start": 3723.25, "end": 3725.5, "text": " General Kenobi."},
    ],
}


def test_srt_and_vtt_cues() -> None:
    body, media = openai_audio.render(RESULT, "srt", "transcribe")
    assert media.startswith("text/plain")
    assert body.decode() == "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,500\nGeneral Kenobi.\n\n"
    body, media = openai_audio.render(RESULT, "vtt", "transcribe")
    assert media.startswith("text/vtt") and body.decode().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n")


def test_json_text_and_verbose_json() -> None:
    assert json.loads(openai_audio.render(RESULT, "json", "transcribe")[0]) == {
        "text": RESULT["text"],
        "usage": {"type": "duration", "seconds": 3726},
    }
    assert openai_audio.render(RESULT, "text", "transcribe")[0] == b"Hello there. General Kenobi.\n"
    doc = json.loads(openai_audio.render(RESULT, "verbose_json", "translate")[0])
    assert doc["task"] == "translate" and doc["language"] == "en" and doc["duration"] == 3725.5
    assert doc["segments"][1] == {"id": 1, "seek": 0, "start": 3723.25, "end": 3725.5, "text": " General Kenobi."}


# --- the demo model's config ----------------------------------------------------------------------------
def test_whisper_config_round_trips_and_checks_its_options() -> None:
    config = whisper_model.config_whisper()
    assert config.engine == "whisper" and config.file == "model.bin" and config.options["max_audio_seconds"] == "600"
    assert modelconfig.parse(modelconfig.to_dict(config)) == config
    bad = modelconfig.to_dict(config)
    bad["options"]["pack_seconds"] = "29"  # type: ignore[index]
    with pytest.raises(errors.InvalidArgument, match="options.pack_seconds"):
        modelconfig.parse(bad)


@pytest.mark.parametrize(
    ("cpuinfo", "compute"),
    [
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n", "float32"),  # oneDNN's AVX2 u8s8: float32
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", "int8"),
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2\n", "int8"),  # MKL's int8
        ("vendor_id\t: HygonGenuine\nflags\t\t: sse2 avx2 avx_vnni\n", "int8"),
        ("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n", "int8"),  # aarch64: CTranslate2's default
        ("", "int8"),
    ],
)
def test_the_cpu_compute_type_is_int8_only_where_its_kernels_keep_the_accuracy(cpuinfo: str, compute: str) -> None:
    assert cpu_compute_type(cpuinfo * 2) == compute  # one block per core: the first one decides
