"""The text a conversation is cached under, free of transports.

A conversation (system prompt, earlier turns, last user message) becomes:
  - `spliced`: ModelCache's concatenation, `role###content|||role###content` (its query_multi_splicing):
    what ModelCache stores and returns as `hit_query`, and what the exact-match key is computed over;
  - `embedding_text`: the contents joined by newlines (roles add the same tokens to every text and only
    blur the vectors), what the embedding model sees;
  - `exact_key`: a hash of the spliced text normalised (Unicode NFKC, case folded, whitespace collapsed,
    trailing punctuation dropped), so "What is X?" and "what  is x" share one entry without a vector search;
  - `question`: the last message's text, and `context_key`: a hash of everything before it (system prompt,
    earlier turns; normalised as above, "" when there is nothing before). A semantic hit needs the same
    context: "yes, go on" after two different conversations, or one question under two system prompts, are
    different questions whatever their embeddings say. Within one context the verifier and the guard
    compare the questions.

Thresholds: like ModelCache (`similarity_threshold` for short texts, `similarity_threshold_long` for
long ones), with the boundary a setting: ModelCache splits at 256 characters; ours defaults to 80, chosen
on the evaluation sets (a short question changed in one word stays very close to the original, so short
texts need the higher threshold; paraphrases of longer texts legitimately drift further).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LONG_TEXT_CHARS = 80
"""Default boundary between short and long query texts (characters of the embedded text)."""

ROLE_SEP = "###"
TURN_SEP = "|||"
_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.!?。！？]+$")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class QueryTextError(ValueError):
    """The conversation cannot be cached (empty, unknown role); the message says why."""


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class QueryText:
    spliced: str
    embedding_text: str
    exact_key: str
    question: str = ""
    context_key: str = ""

    def long(self, boundary: int = LONG_TEXT_CHARS) -> bool:
        return len(self.embedding_text) > boundary


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _SPACE.sub(" ", text).strip()
    return _TRAILING.sub("", text)


def splice(turns: Iterable[Turn]) -> str:
    return TURN_SEP.join(f"{t.role}{ROLE_SEP}{t.content}" for t in turns)


def _joined(contents: Iterable[str]) -> str:
    """The text to embed: the non-empty contents, stripped, one per line."""
    return "\n".join(c.strip() for c in contents if c.strip())


def _turn_key(role: str, content: str) -> str:
    return f"{'system' if role == 'developer' else role}{ROLE_SEP}{normalise(content)}"


def _context_key(keys: Sequence[str]) -> str:
    return hashlib.blake2b(TURN_SEP.join(keys).encode(), digest_size=16).hexdigest() if keys else ""


def question_of(spliced: str) -> tuple[str, str]:
    """(question, context_key) of a stored entry, from its spliced query, as query_text makes them."""
    turns = [turn.partition(ROLE_SEP) for turn in spliced.split(TURN_SEP)]
    return turns[-1][2].strip(), _context_key([_turn_key(role, content) for role, _, content in turns[:-1]])


def query_text(turns: Sequence[Turn]) -> QueryText:
    if not turns:
        raise QueryTextError("the query holds no messages")
    for i, t in enumerate(turns):
        if t.role not in _ROLES:
            raise QueryTextError(f"message {i}: unknown role {t.role!r} (system, user, assistant)")
    if not any(t.content.strip() for t in turns if t.role != "assistant"):
        raise QueryTextError("the query is empty (no system or user text)")
    spliced = splice(turns)
    embedding_text = _joined(t.content for t in turns)
    keys = [_turn_key(t.role, t.content) for t in turns]
    key = hashlib.blake2b(TURN_SEP.join(keys).encode(), digest_size=16).hexdigest()
    return QueryText(spliced, embedding_text, key, turns[-1].content.strip(), _context_key(keys[:-1]))


def threshold_for(text: QueryText, short: float, long: float, boundary: int = LONG_TEXT_CHARS) -> float:
    return long if text.long(boundary) else short


def scope_key(model: str, tenant: str) -> str:
    """One token per scope (tenant and model), stored with every entry and filtered on in every search:
    a hex digest, so it is safe inside a Milvus filter expression whatever the names hold."""
    return hashlib.blake2b(f"{tenant}\0{model}".encode(), digest_size=16).hexdigest()
