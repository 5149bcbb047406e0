"""Rubrics (how to ask a judge model about one response and how to read its reply) and the one
scoring path shared by every rubric judge: messages -> replies -> parsed, averaged :class:`Verdict`.
The transports are :class:`~finesteer.evaluate.judges.llm_http.LLMJudge` (HTTP) and
:class:`~finesteer.evaluate.judges.local.LocalModelJudge` (a local generation callable).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from finesteer.evaluate.verdict import Verdict, check_pairs

__all__ = ["ChatMessages", "Rubric", "RubricJudge"]

#: (system prompt, user prompt) for one judge call.
ChatMessages = tuple[str, str]

_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response)\}")
# Reasoning models (e.g. Qwen3, DeepSeek-R1) may prefix their answer with a <think> block whose
# numbers / yes-no words must not be read as the verdict.
_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Rubric:
    """How to ask a judge model about one response and how to read its answer.

    ``user_template`` contains ``{response}`` and usually ``{prompt}``; they are substituted in one
    pass, so braces inside the prompt/response text are safe. ``kind="binary"``: the reply is parsed
    for the first "yes"/"no" (yes -> 1.0 with ``positive_label``, no -> 0.0 with ``negative_label``).
    ``kind="scale"``: the first number in the reply lying within [``low``, ``high``].
    """

    name: str
    system_prompt: str
    user_template: str
    kind: Literal["binary", "scale"]
    low: float = 0.0
    high: float = 1.0
    positive_label: str | None = None
    negative_label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "scale"):
            raise ValueError(f"rubric {self.name!r}: kind must be 'binary' or 'scale', got {self.kind!r}")
        if "{response}" not in self.user_template:
            raise ValueError(f"rubric {self.name!r}: user_template must contain '{{response}}'")
        if not self.low < self.high:
            raise ValueError(f"rubric {self.name!r}: need low < high, got {self.low}, {self.high}")

    def messages(self, prompt: str, response: str) -> ChatMessages:
        """The (system, user) messages that ask the judge about this pair."""
        values = {"prompt": prompt, "response": response}
        user = _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.user_template)
        return (self.system_prompt, user)

    def parse(self, reply: str) -> float | None:
        """Read the score from a judge reply (ignoring any ``<think>`` block); None when unreadable."""
        reply = _THINK_RE.sub(" ", reply)
        if self.kind == "binary":
            m = _YES_NO_RE.search(reply)
            if m is None:
                return None
            return 1.0 if m.group(1).lower() == "yes" else 0.0
        for m in _NUMBER_RE.finditer(reply):
            value = float(m.group(0))
            if self.low <= value <= self.high and math.isfinite(value):
                return value
        return None

    def label_for(self, score: float) -> str | None:
        """Label for an (averaged) binary score: majority vote; None on an exact tie or for scales."""
        if self.kind != "binary":
            return None
        if score > 0.5:
            return self.positive_label
        if score < 0.5:
            return self.negative_label
        return None

    def describe(self) -> str:
        """Short description of what the reply must contain, for error messages."""
        if self.kind == "binary":
            return "a yes/no answer"
        return f"a number in [{self.low:g}, {self.high:g}]"


class RubricJudge(ABC):
    """Shared rubric -> messages -> replies -> parsed, averaged Verdict logic.

    Subclasses only implement :meth:`_complete` (the transport). Unparsable replies are re-requested
    up to ``max_parse_retries`` extra rounds; a pair with no parsable reply gets ``score=None``.
    """

    def __init__(self, rubric: Rubric, *, n_samples: int, max_parse_retries: int) -> None:
        if not isinstance(rubric, Rubric):
            raise TypeError(f"rubric must be a Rubric, got {type(rubric).__name__}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if max_parse_retries < 0:
            raise ValueError(f"max_parse_retries must be >= 0, got {max_parse_retries}")
        self.rubric = rubric
        self.n_samples = n_samples
        self.max_parse_retries = max_parse_retries

    @abstractmethod
    def _complete(self, messages: Sequence[ChatMessages], counts: Sequence[int]) -> list[list[str]]:
        """Return ``counts[i]`` judge replies for ``messages[i]`` (fewer is tolerated)."""

    def judge(self, prompt: str, response: str) -> Verdict:
        """Judge one (prompt, response) pair with the rubric."""
        return self.judge_many([(prompt, response)])[0]

    def judge_many(self, pairs: Iterable[tuple[str, str]]) -> list[Verdict]:
        """Judge many pairs; replies are requested in batches, unparsable ones re-requested."""
        checked = check_pairs(pairs)
        messages = [self.rubric.messages(p, r) for p, r in checked]
        replies: list[list[str]] = [[] for _ in checked]
        scores: list[list[float]] = [[] for _ in checked]
        attempts = 0
        for _ in range(1 + self.max_parse_retries):
            todo = [i for i in range(len(checked)) if len(scores[i]) < self.n_samples]
            if not todo:
                break
            attempts += 1
            outs = self._complete(
                [messages[i] for i in todo], [self.n_samples - len(scores[i]) for i in todo]
            )
            if len(outs) != len(todo):
                raise RuntimeError(
                    f"judge transport returned {len(outs)} reply lists for {len(todo)} requests"
                )
            for i, texts in zip(todo, outs, strict=True):
                for text in texts[: self.n_samples - len(scores[i])]:
                    replies[i].append(text)
                    value = self.rubric.parse(text)
                    if value is not None:
                        scores[i].append(value)
        return [self._verdict(replies[i], scores[i], attempts) for i in range(len(checked))]

    def _verdict(self, replies: list[str], scores: list[float], attempts: int) -> Verdict:
        rubric = self.rubric
        n_unparsable = len(replies) - len(scores)
        raw: dict[str, Any] = {
            "rubric": rubric.name,
            "samples": list(replies),
            "scores": list(scores),
            "n_requested": self.n_samples,
            "n_unparsable": n_unparsable,
        }
        if not scores:
            last = replies[-1] if replies else "<no reply>"
            if len(last) > 200:
                last = last[:200] + "..."
            return Verdict(
                None,
                None,
                f"no parsable score: none of {len(replies)} judge replies over {attempts} attempt(s) "
                f"contained {rubric.describe()}; last reply: {last!r}",
                raw,
            )
        mean = float(sum(scores) / len(scores))
        label = rubric.label_for(mean)
        if rubric.kind == "binary":
            n_yes = int(sum(scores))
            reason = f"{label or 'tie'}: judge answered yes in {n_yes}/{len(scores)} sample(s)"
        else:
            reason = f"mean of {len(scores)} judge score(s) on [{rubric.low:g}, {rubric.high:g}]: {mean:g}"
        if len(scores) < self.n_samples:
            reason += f" (only {len(scores)} of {self.n_samples} requested samples were parsable)"
        if n_unparsable:
            reason += f"; {n_unparsable} unparsable repl{'y' if n_unparsable == 1 else 'ies'} discarded"
        return Verdict(label, mean, reason, raw)
