"""Typed, immutable dataset rows.

Every loader returns one of three row types, so downstream code (attribution, steering, evaluation)
never has to know which upstream file or column names a row came from. The constructors validate
their own invariants; loaders add the file name and line number when that validation fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from finesteer.data.errors import DatasetError
from finesteer.errors import FinesteerError


class ItemError(FinesteerError, ValueError):
    """An item with malformed fields; a loader reports it as a `DatasetError` with the file and line."""


# An answer option is a line that starts with "(X)", optionally indented: the layout of the CAA and
# Anthropic-evals questions ("Choices:\n (A) Yes\n (B) No"). Inline mentions such as the HSI
# instruction 'Answer: (A) / (B)' are deliberately not options. The one option-line pattern:
# indent, letter, and the rest of the line as written.
_OPTION_LINE = re.compile(r"^([ \t]*)\(([A-Z])\)(.*)$", re.MULTILINE)

_ANSWER_RE = re.compile(r"\(([A-Z])\)")
_CHOICES_SPLIT = re.compile(r"\n\s*Choices:\s*\n")


@dataclass(frozen=True)
class OptionLine:
    """One "(X) text" line of a question.

    `text` is the rest of the line exactly as written (blanks after "(X)" kept); `start`/`end` are
    the line's span in the question, indent included.
    """

    indent: str
    letter: str
    text: str
    start: int
    end: int


def option_lines(question: str) -> list[OptionLine]:
    """Every option line of `question`, in order (repeated letters included)."""
    return [
        OptionLine(m.group(1), m.group(2), m.group(3), m.start(), m.end())
        for m in _OPTION_LINE.finditer(question)
    ]


def option_letters(question: str) -> tuple[str, ...]:
    """Letters of the answer options listed in `question`, in order of appearance, e.g. ("A", "B", "C").

    Most items have two options, but some (CAA survival-instinct) list up to eight, so code that
    scores A/B answers should use this instead of assuming ("A", "B"). Empty when the question has
    no options laid out one per line.
    """
    seen: list[str] = []
    for line in option_lines(question):
        if line.letter not in seen:
            seen.append(line.letter)
    return tuple(seen)


def option_text(question: str, letter: str) -> str:
    """The text of option `letter` as listed in the question ("(A) Yes, gladly" → "Yes, gladly"); ""
    when the question lists no such option."""
    for line in option_lines(question):
        if line.letter == letter:
            return line.text.strip()
    return ""


def question_stem(question: str) -> str:
    """The question without its "Choices:" block (the request an open-ended answer replies to)."""
    return _CHOICES_SPLIT.split(question, maxsplit=1)[0].strip()


def answer_letter(answer: str) -> str:
    """The bare letter of an answer written "(X)": "(B)" → "B".

    Raises `ValueError` for anything else, because a silently mis-parsed label flips the sign of a
    steering direction.
    """
    match = _ANSWER_RE.fullmatch(answer)
    if match is None:
        raise ItemError(f"answer {answer!r} is not of the form '(X)' with X a capital letter")
    return match.group(1)


def _require_text(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ItemError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ItemError(f"{what} is empty")


@dataclass(frozen=True)
class ABItem:
    """A multiple-choice item: the full question (choices included) and the two answers to contrast.

    `matching` is the answer that shows the behaviour (the positive side of a steering direction),
    `not_matching` the contrasting one; both are written "(X)". The question text is kept whole
    because the choices live inside it; `options` recovers the letters.
    """

    question: str
    matching: str
    not_matching: str
    id: str

    def __post_init__(self) -> None:
        _require_text(self.question, "question")
        matching = answer_letter(self.matching)
        not_matching = answer_letter(self.not_matching)
        if matching == not_matching:
            raise ItemError(f"matching and not_matching are both {self.matching!r}")
        options = self.options
        if options:
            for name, letter in (("matching", matching), ("not_matching", not_matching)):
                if letter not in options:
                    raise ItemError(
                        f"{name} answer ({letter}) is not one of the question's options {options}"
                    )

    @property
    def options(self) -> tuple[str, ...]:
        """Letters of the options listed in the question (may be more than two)."""
        return option_letters(self.question)

    @property
    def matching_letter(self) -> str:
        """Bare letter of the behaviour-matching answer, e.g. "A"."""
        return answer_letter(self.matching)

    @property
    def not_matching_letter(self) -> str:
        """Bare letter of the contrasting answer, e.g. "B"."""
        return answer_letter(self.not_matching)

    def answer_text(self, letter: str) -> str:
        """The text of option `letter` ("(A) I cannot help" → "I cannot help").

        Raises `DatasetError` when the question does not list that option one per line.
        """
        if letter not in self.options:
            raise DatasetError(
                f"item {self.id}: option ({letter}) not found in question {self.question[:60]!r}"
            )
        return option_text(self.question, letter)


@dataclass(frozen=True)
class PromptItem:
    """A single instruction: a harmful, harmless or over-refusal probe prompt.

    `category` is the upstream category (XSTest: its `type`), `source` the upstream source dataset(s)
    (refusal-direction: the origins joined with ";"), `label` a safety label where one exists
    (XSTest: "safe"/"unsafe"), `target` an affirmative reply prefix where one exists (AdvBench/JBB
    "Sure, here is …"). `extra` keeps the remaining non-empty upstream columns as (column, value)
    pairs so nothing is lost while the row stays hashable.
    """

    prompt: str
    id: str
    category: str | None = None
    source: str | None = None
    label: str | None = None
    target: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _require_text(self.prompt, "prompt")

    def get_extra(self, column: str, default: str | None = None) -> str | None:
        """Value of an extra upstream column (e.g. XSTest "focus", JBB "Behavior"), or `default`."""
        for key, value in self.extra:
            if key == column:
                return value
        return default


@dataclass(frozen=True)
class OpenEndedItem:
    """A question without answer choices, for free-generation evaluation."""

    question: str
    id: str

    def __post_init__(self) -> None:
        _require_text(self.question, "question")


Item = ABItem | PromptItem | OpenEndedItem
"""Any row a loader can return."""

ABTriple = tuple[str, str, str]
"""(question stem, matching option text, not-matching option text): the STA authors' pair layout."""


def ab_triples(items: Iterable[ABItem]) -> list[ABTriple]:
    """One (question stem, matching text, not-matching text) triple per A/B item.

    Raises `DatasetError` for an item whose question does not list its answers one per line.
    """
    return [
        (
            question_stem(item.question),
            item.answer_text(item.matching_letter),
            item.answer_text(item.not_matching_letter),
        )
        for item in items
    ]
