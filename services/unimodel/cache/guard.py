"""A check after the vector search: two texts close in embedding space that still ask different things.

Sentence embeddings place a question and its negation ("How do I enable X?" / "How do I not enable X?"),
or the same question about other numbers ("... in 2019" / "... in 2021"), next to each other: the words
are nearly the same. Serving one's answer for the other is the wrong hit users complain about most.
`compatible` refuses such a pair: a different set of numbers, or negation on one side only.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[a-z']+")
_NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "nor", "none", "nobody", "nothing", "neither"})


def numbers(text: str) -> frozenset[str]:
    return frozenset(n.replace(",", "") for n in _NUMBER.findall(text))


def negated(text: str) -> bool:
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def compatible(query: str, cached: str) -> bool:
    if numbers(query) != numbers(cached):
        return False
    return negated(query) == negated(cached)
