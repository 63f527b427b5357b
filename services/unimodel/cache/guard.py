"""A check after the vector search: two texts close in embedding space that still ask different things.

Sentence embeddings place a question next to its negation ("How do I enable X?" / "... not enable X?"),
the same question about other numbers or codes ("... in 2019" / "... in 2021", "T3 L1" / "T1 L3"), about
another named thing ("rehab centre near Long County" / "... near Banks County") or with the two sides of
a comparison swapped ("Is Messi better than Ronaldo?" / "Is Ronaldo better than Messi?") or one word
replaced by its opposite ("Is coffee good for your heart?" / "... bad for ..."; "ascending" / "descending"):
the words are nearly the same. Serving one's answer for the other is the wrong hit users complain about most.
`compatible` refuses such a pair. Chosen on the evaluation sets (docs/benchmarks.md, cache quality): on
QQP it removes a fifth of the false hits above the threshold at a small cost in true hits.
"""

from __future__ import annotations

import re
import unicodedata

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9+\-']*")
_WORD = re.compile(r"[a-z0-9]+")
_NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "nor", "none", "nobody", "nothing", "neither"})
_COMPARE = frozenset({"than", "to", "vs", "versus", "or"})
_STOP = frozenset(
    "a an the of in on for to and or is are was were be been do does did how what why which who whom whose when "
    "where can could should would will shall may might my your our their his her its this that these those i you "
    "we they he she it me us them with by at as from into than vs versus if then so about".split()
)


_OPPOSITES = tuple(
    tuple(pair.split("/"))
    for pair in (
        "good/bad better/worse best/worst increase/decrease increasing/decreasing increased/decreased "
        "ascending/descending asc/desc more/less most/least max/min maximum/minimum maximize/minimize "
        "before/after buy/sell buying/selling bought/sold upload/download cheap/expensive high/low higher/lower "
        "highest/lowest fast/slow faster/slower fastest/slowest hot/cold big/small bigger/smaller biggest/smallest "
        "large/small larger/smaller largest/smallest long/short longer/shorter longest/shortest old/new older/newer "
        "oldest/newest start/stop enable/disable enabled/disabled open/close win/lose gain/lose add/remove "
        "import/export input/output positive/negative pros/cons true/false rich/poor safe/dangerous "
        "healthy/unhealthy legal/illegal male/female men/women man/woman boy/girl boys/girls north/south "
        "east/west first/last early/late easy/difficult strong/weak love/hate like/dislike happy/sad "
        "agree/disagree accept/reject include/exclude encrypt/decrypt compress/decompress lock/unlock "
        "install/uninstall connect/disconnect push/pull send/receive forward/backward inside/outside "
        "internal/external upper/lower uppercase/lowercase above/below plus/minus odd/even "
        "advantages/disadvantages benefits/drawbacks lose/gain heavier/lighter heavy/light"
    ).split()
)
"""Word pairs whose swap asks the opposite question (single words, as `_WORD` splits them)."""


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def numbers(text: str) -> frozenset[str]:
    return frozenset(n.replace(",", "") for n in _NUMBER.findall(_norm(text)))


def codes(text: str) -> frozenset[str]:
    """Tokens with digits in them (iPhone 6s, T3, AB+1), case folded."""
    return frozenset(w.lower() for w in _TOKEN.findall(_norm(text)) if any(c.isdigit() for c in w))


def negated(text: str) -> bool:
    words = re.findall(r"[a-z']+", _norm(text).casefold())
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def names(text: str) -> set[str]:
    """Capitalised words after the first (proper nouns, mostly), case folded."""
    return {w.lower() for i, w in enumerate(_TOKEN.findall(_norm(text))) if i and w[0].isupper() and w.lower() not in _STOP}


def _content(text: str) -> list[str]:
    return [w for w in _WORD.findall(_norm(text).casefold()) if w not in _STOP]


def _comparisons(words: list[str]) -> set[tuple[str, str]]:
    return {(words[i - 1], words[i + 1]) for i, w in enumerate(words) if w in _COMPARE and 0 < i < len(words) - 1}


def swapped(query: str, cached: str) -> bool:
    """The two sides of a comparison or conversion exchanged (X than Y / Y than X, X to Y / Y to X)."""
    wq, wc = _WORD.findall(_norm(query).casefold()), _WORD.findall(_norm(cached).casefold())
    pq, pc = _comparisons(wq), _comparisons(wc)
    if any((b, a) in pc and (a, b) not in pc for a, b in pq):
        return True
    cq, cc = _content(query), _content(cached)
    return sorted(cq) == sorted(cc) and cq != cc and bool(_COMPARE & set(wq))


def renamed(query: str, cached: str) -> bool:
    """A named thing replaced by another: each side has a proper noun the other does not mention at all."""
    nq, nc = names(query), names(cached)
    only_q, only_c = nq - nc, nc - nq
    if not only_q or not only_c:
        return False
    return bool(only_q - set(_content(cached))) and bool(only_c - set(_content(query)))


def opposed(query: str, cached: str) -> bool:
    """One text uses a word where the other uses its opposite (good / bad, ascending / descending)."""
    wq, wc = set(_WORD.findall(_norm(query).casefold())), set(_WORD.findall(_norm(cached).casefold()))
    only_q, only_c = wq - wc, wc - wq
    return any((a in only_q and b in only_c) or (b in only_q and a in only_c) for a, b in _OPPOSITES)


def compatible(query: str, cached: str) -> bool:
    if numbers(query) != numbers(cached) or codes(query) != codes(cached):
        return False
    if negated(query) != negated(cached):
        return False
    return not swapped(query, cached) and not renamed(query, cached) and not opposed(query, cached)
