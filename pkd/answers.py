"""Exact match of a model's answer against a prompt's reference: what `pkd eval` reports and what
`pkd proxy-align` calls the proxy's task skill, so the two always agree on what "right" means.

The answer is the whole response, or with an `answer_pattern` the last thing the pattern finds in
it (its first group when it has one), e.g. `(?:Answer:|[Tt]he answer is)\\s*(-?\\d+)` for the toy
world or `#### (\\S+)` for GSM8K; it matches when it equals the reference up to whitespace and
case. Plain `re`, no heavy imports: the core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def stated_answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The part of a response exact match compares: all of it, or the last `pattern` match
    (its first group when it has one); None when the pattern finds nothing."""
    if pattern is None:
        return text
    found = list(pattern.finditer(text))
    if not found:
        return None
    m = found[-1]
    return m.group(1) if pattern.groups else m.group(0)


def matches(answer: str, reference: str, pattern: re.Pattern[str] | None) -> bool:
    """Exact match: the stated answer equals the reference up to whitespace and case."""
    stated = stated_answer(answer, pattern)
    return stated is not None and _normalise(stated) == _normalise(reference)


def exact_match_hits(answers: Iterable[str], references: Iterable[str], pattern: str | None) -> int:
    """How many answers match their references (pairs in order)."""
    compiled = re.compile(pattern) if pattern else None
    return sum(matches(a, r, compiled) for a, r in zip(answers, references, strict=True))


def describe(pattern: str | None) -> str:
    """How the answer is extracted, in words for reports."""
    return f"the last match of {pattern!r} (group 1 if any)" if pattern else "the whole response"
