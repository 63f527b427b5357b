"""Whisper's input and output, apart from the engine: log-mel features, packing short clips into shared
30-second windows, and reading timestamped segments out of the generated tokens. Plain numpy; no model.

Features are Whisper's: 16 kHz samples, 25 ms Hann windows every 10 ms (n_fft 400, hop 160, reflect
padding), power spectrum, 80 Slaney-normalised mel filters (0-8 kHz), log10 clamped at 8 below the
maximum of the audio, scaled as (x + 4) / 4; 3,000 frames a 30-second window (the encoder's fixed input:
shorter windows made it repeat itself, measured in docs/benchmarks.md). The same numbers as
faster-whisper's FeatureExtractor (checked to 0.0 difference on a clip when this was written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * RATE
FRAMES = WINDOW_SAMPLES // HOP  # 3,000
SECONDS_PER_TIMESTAMP = 0.02


@cache
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """float32 [n_mels, N_FFT // 2 + 1]: librosa's `mel(sr=16000, n_fft=400, n_mels=80)` (Slaney scale and norm)."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(RATE / 2.0)), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    weights = np.maximum(0.0, np.minimum(-ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


@cache
def _hann() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic, as torch.hann_window


def log_mel(samples: np.ndarray) -> np.ndarray:
    """float32 [N_MELS, len(samples) // HOP] of 16 kHz samples."""
    padded = np.pad(samples.astype(np.float32, copy=False), (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _hann(), axis=1)) ** 2
    mel = mel_filters() @ power[:-1].T
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).astype(np.float32)


@dataclass
class Piece:
    """One 30-second window of a clip: where it starts and how long its audio is (seconds), and its features."""

    start: float
    seconds: float
    features: np.ndarray


def cuts(samples: np.ndarray, search_seconds: float = 10.0, frame: int = 320) -> list[tuple[int, int]]:
    """(first, end) sample ranges of at most 30 s covering the audio. A longer clip is cut at the quietest 20 ms
    of the last `search_seconds` before each 30 s limit, so a cut falls in a pause and not inside a word (fixed
    30 s cuts split words, and the window on each side then loses them)."""
    out: list[tuple[int, int]] = []
    start, n = 0, len(samples)
    search = int(search_seconds * RATE)
    while n - start > WINDOW_SAMPLES:
        lo = start + WINDOW_SAMPLES - search
        frames = (WINDOW_SAMPLES - (lo - start)) // frame
        energy = np.square(samples[lo : lo + frames * frame].reshape(frames, frame)).mean(axis=1)
        quietest = frames - 1 - int(np.argmin(energy[::-1]))  # the latest of equally quiet frames
        cut = lo + quietest * frame + frame // 2
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out


def window_features(samples: np.ndarray) -> np.ndarray:
    """float32 [N_MELS, FRAMES] of at most 30 s of audio, padded with silence to 30 s (as Whisper pads)."""
    padded = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    padded[: len(samples)] = samples[:WINDOW_SAMPLES]
    return log_mel(padded)


def windows(samples: np.ndarray) -> list[Piece]:
    """The audio as 30-second windows (cut in pauses: `cuts`), each padded with silence."""
    return [Piece(a / RATE, (b - a) / RATE, window_features(samples[a:b])) for a, b in cuts(samples)]


# --- packing short clips ---------------------------------------------------------------------------------
@dataclass
class Placed:
    """One clip in a shared window: which clip, where it starts and ends in the window (seconds)."""

    clip: int
    start: float
    end: float


def pack(lengths: Sequence[float], pack_seconds: float, gap_seconds: float, groups: Sequence[str]) -> list[list[int]]:
    """Clips (their lengths in seconds) grouped into shared windows: clips of at most `pack_seconds` with the
    same group (the caller's tenant: one caller's words never share a decoding with another's) fill a window
    in order, `gap_seconds` of silence apart, until the next would pass 30 s. A longer clip, and every clip
    when `pack_seconds` is 0, is a group of its own."""
    out: list[list[int]] = []
    open_windows: dict[str, tuple[list[int], float]] = {}  # group -> (clips, seconds used)
    for i, seconds in enumerate(lengths):
        if pack_seconds <= 0 or seconds > pack_seconds:
            out.append([i])
            continue
        clips, used = open_windows.get(groups[i], ([], 0.0))
        need = seconds if not clips else used + gap_seconds + seconds
        if clips and need > WINDOW_SECONDS - gap_seconds:
            out.append(clips)
            clips, need = [], seconds
        clips.append(i)
        open_windows[groups[i]] = (clips, need)
    out.extend(clips for clips, _ in open_windows.values() if clips)
    return sorted(out, key=lambda clips: clips[0])


# --- segments out of tokens ------------------------------------------------------------------------------
@dataclass
class Segment:
    start: float
    end: float
    tokens: list[int]


def segments(tokens: Sequence[int], timestamp_begin: int, eot: int, window_seconds: float = WINDOW_SECONDS) -> list[Segment]:
    """Timestamped segments of one window's generated tokens (`<|t0|> text <|t1|>` pairs; timestamp tokens
    are `timestamp_begin` + t / 0.02 s). Text after the last timestamp runs to the window's end; text with no
    timestamp at all (a prompt without them) is one segment of the whole window."""
    out: list[Segment] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            at = (token - timestamp_begin) * SECONDS_PER_TIMESTAMP
            if start is None:
                start = at
            else:
                if text:
                    out.append(Segment(start, max(at, start), text))
                start, text = None, []
        elif token < eot:
            text.append(token)
    if text:
        begin = start if start is not None else (out[-1].end if out else 0.0)
        out.append(Segment(begin, max(window_seconds, begin), text))
    return out


def owner(segment: Segment, placed: Sequence[Placed], tolerance: float) -> Placed | None:
    """The clip a packed window's segment belongs to: the one whose span holds it, give or take `tolerance`
    seconds at each end; None when it spans two clips or lies in none (the clips are then transcribed alone)."""
    for p in placed:
        if segment.start >= p.start - tolerance and segment.end <= p.end + tolerance:
            return p
    return None
