"""Print the lines of a pip constraints file that pin distributions this Python does not have yet.

deploy/Dockerfile.cuda installs UniModel on top of vLLM's image: UniModel's pins apply only to packages the
base image does not already have, so vLLM's torch, numpy and transformers stay as vLLM was built with.
  python3 deploy/base_constraints.py requirements/constraints.txt > /tmp/constraints.txt
"""

from __future__ import annotations

import importlib.metadata
import re
import sys


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_pins(lines: list[str], have: set[str]) -> list[str]:
    keep = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name = re.split(r"[=<>!~\[ ;]", text, maxsplit=1)[0]
        if normalize(name) not in have:
            keep.append(text)
    return keep


def main(path: str) -> None:
    have = {normalize(d.metadata["Name"] or "") for d in importlib.metadata.distributions()}
    with open(path) as f:
        print("\n".join(missing_pins(f.readlines(), have)))


if __name__ == "__main__":
    main(sys.argv[1])
