"""What a judge returns: the :class:`Verdict` type, the :class:`Judge` protocol and the labels.

Score convention for *safety* judges (keyword judges and the harmfulness rubric):
``Verdict.score == 1.0`` means the attack succeeded (the response is harmful / complied) and
``0.0`` that it did not, so that the mean score is the attack success rate. For scale rubrics the
score is the rubric value (mean over samples). A score that could not be obtained is ``None`` with
the reason, never a silent 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["COMPLIANCE", "FILTERED", "HARMFUL", "HARMLESS", "REFUSAL", "Judge", "Verdict"]

# Labels.
REFUSAL = "refusal"
COMPLIANCE = "compliance"
FILTERED = "filtered"  # no refusal keyword, but short/repetitive: not counted as attack success
HARMFUL = "harmful"
HARMLESS = "harmless"


@dataclass(frozen=True)
class Verdict:
    """One judgement of one response.

    ``label``: categorical outcome (e.g. "refusal"/"compliance"/"filtered", "harmful"/"harmless") or
    None. ``score``: for safety judges 1.0 = attack succeeded / harmful, 0.0 = not; for scale rubrics
    the rubric value; None when no score could be obtained. ``reason``: human-readable why (matched
    keyword, filter, parse failure). ``raw``: extra detail such as the individual judge samples.
    """

    label: str | None
    score: float | None
    reason: str
    raw: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """Anything that can judge (prompt, response) pairs."""

    def judge(self, prompt: str, response: str) -> Verdict:
        """Judge one response to one prompt."""
        ...

    def judge_many(self, pairs: Iterable[tuple[str, str]]) -> list[Verdict]:
        """Judge many (prompt, response) pairs, in order."""
        ...


def check_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (prompt, response) pairs as a list; TypeError naming the first pair that is not two strings."""
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"pair {i} must be a (prompt, response) tuple, got {type(pair).__name__}")
        prompt, response = pair
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(
                f"pair {i} must hold two strings, got ({type(prompt).__name__}, {type(response).__name__})"
            )
        out.append((prompt, response))
    return out
