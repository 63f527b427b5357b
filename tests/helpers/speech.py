"""The espeak-ng speech clips of tests/data/speech (scripts/make_speech_samples.py) and word error rate."""

from __future__ import annotations

import json
import re
from pathlib import Path

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
SENTENCES: dict[str, dict[str, str]] = json.loads((SPEECH / "sentences.json").read_text())
"""clip file name -> {"language", "text"}"""
ENGLISH = sorted(name for name, s in SENTENCES.items() if s["language"] == "en")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): Levenshtein over lower-cased words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)
