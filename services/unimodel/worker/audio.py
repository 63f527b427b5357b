"""Audio files -> mono float32 samples at the rate a speech model reads (16 kHz for whisper).

Decoding is libsndfile's, through the `soundfile` wheel (libsndfile 1.2 inside the wheel: WAV, FLAC, MP3,
OGG Vorbis and Opus, AIFF, and more), and resampling is libsoxr's through the `soxr` wheel: no ffmpeg and no
system library. Channels are averaged. What cannot be decoded is a clear error, never a 500:
  - an empty file, or one under 0.1 s: InvalidArgument (400);
  - a format libsndfile does not read (e.g. AAC / M4A, WebM): UnsupportedMediaType (415) naming the formats;
  - a file in a known container that is damaged: InvalidArgument (400);
  - longer than the model's limit: PayloadTooLarge (413) naming the limit, checked from the header before
    the samples are decoded.
"""

from __future__ import annotations

import io

import numpy as np

from unimodel.core import errors

ACCEPTED = "WAV, FLAC, MP3, OGG (Vorbis, Opus), AIFF"
MIN_SECONDS = 0.1  # as OpenAI's API: shorter is a 400
"""The formats a client may send, as the 415 names them."""

_MAGIC = (
    (b"RIFF", "WAV"),
    (b"RF64", "WAV"),
    (b"fLaC", "FLAC"),
    (b"OggS", "OGG"),
    (b"ID3", "MP3"),
    (b"FORM", "AIFF"),
)


def sniff(data: bytes) -> str | None:
    """The format the first bytes announce (a hint for errors), None when unknown."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG audio frame sync
        return "MP3"
    return None


def decode(data: bytes, rate: int, max_seconds: float, *, field: str = "file") -> np.ndarray:
    """float32 [samples] at `rate`, mono, from an audio file's bytes; errors as above."""
    import soundfile

    if not data:
        raise errors.InvalidArgument("the audio file is empty", field=field)
    try:
        handle = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        known = sniff(data)
        if known is None:
            raise errors.UnsupportedMediaType(
                f"the audio format is not one this server decodes; send {ACCEPTED}", field=field, accepted=ACCEPTED
            ) from None
        raise errors.InvalidArgument(f"the {known} file cannot be decoded: {_short(exc)}", field=field) from None
    with handle:
        frames, source_rate = handle.frames, handle.samplerate
        if source_rate <= 0:
            raise errors.InvalidArgument("the audio file has no sample rate", field=field)
        seconds = frames / source_rate if frames >= 0 else 0.0
        if seconds > max_seconds:
            raise errors.PayloadTooLarge(
                f"the audio is {seconds:.1f} s long; this model takes at most {max_seconds:g} s",
                field=field,
                limit="audio_seconds",
            )
        try:
            samples = handle.read(dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise errors.InvalidArgument(f"the audio file cannot be decoded: {_short(exc)}", field=field) from None
    if samples.shape[0] < MIN_SECONDS * source_rate:
        raise errors.InvalidArgument(f"the audio is too short ({samples.shape[0] / source_rate:.3f} s); at least {MIN_SECONDS:g} s", field=field)
    if samples.shape[0] / source_rate > max_seconds:  # a header that under-reported its length
        raise errors.PayloadTooLarge(f"the audio is longer than this model's {max_seconds:g} s", field=field, limit="audio_seconds")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != rate:
        import soxr

        mono = soxr.resample(mono, source_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__
