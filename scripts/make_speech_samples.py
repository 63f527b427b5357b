#!/usr/bin/env python3
"""Make the speech test clips in tests/data/speech/ with espeak-ng (Debian package espeak-ng).

    .venv/bin/python scripts/make_speech_samples.py [--out tests/data/speech]

Each sentence of SENTENCES is spoken by espeak-ng's en-us voice at 130 words a minute (its own WAV: 22,050 Hz,
mono, 16-bit) into NN.wav, and FRENCH into fr.wav (voice fr); sentences.json maps the files to their text.
The clips are committed: the tests and the audio benchmark read them and need no espeak-ng; this script is
how they were made (2026-12-07, espeak-ng 1.51).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOICE, SPEED = "en-us", 130
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please transcribe this short sentence about the weather tomorrow.",
    "Our meeting starts at nine in the morning on Tuesday.",
    "The library will be closed for the holidays next week.",
    "She bought three apples and a loaf of bread at the market.",
    "Turn left at the second traffic light and park behind the school.",
    "A gentle rain fell on the quiet village all night long.",
    "We need to finish the report before the end of the month.",
)
FRENCH = "Bonjour, je voudrais réserver une table pour deux personnes ce soir."


def speak(text: str, voice: str, path: Path) -> None:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(SPEED), "-w", str(path), text], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "speech")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        print("make_speech_samples: espeak-ng is not installed (apt-get install espeak-ng)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    texts: dict[str, dict[str, str]] = {}
    for n, sentence in enumerate(SENTENCES):
        name = f"{n:02d}.wav"
        speak(sentence, VOICE, args.out / name)
        texts[name] = {"language": "en", "text": sentence}
    speak(FRENCH, "fr", args.out / "fr.wav")
    texts["fr.wav"] = {"language": "fr", "text": FRENCH}
    (args.out / "sentences.json").write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} clips to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
