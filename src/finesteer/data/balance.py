"""Letter balancing for A/B items: the same question with its two options' texts exchanged.

Why: a model's A/B answers carry a letter bias, and a steering edit that only shifts that bias (say,
towards "B") scores as a behaviour change on any item set whose matching letters are not exactly
half A and half B. Scoring every item in both orders makes "always A" and "always B" worth exactly
0.5, so what remains is the behaviour. Used by HSI's head and α selection and by `eval ab --balanced`.
`matching_polarity` names the other confound of these files: most behaviour-matching options say "Yes".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

from finesteer.data.items import ABItem, option_lines, option_text
from finesteer.errors import FinesteerError

log = logging.getLogger(__name__)

SWAP_SUFFIX = "~swap"
"""Appended to an item's id by `swap_options`; `unswapped_id` takes it off."""


class SwapError(FinesteerError, ValueError):
    """The item cannot be mirrored (it does not list exactly two options, one per line)."""


def swap_options(item: ABItem) -> ABItem:
    """`item` with the texts of its two options exchanged and its answers relabelled to match.

    "(A) Yes / (B) No, matching (A)" becomes "(A) No / (B) Yes, matching (B)"; the id gets "~swap".
    """
    lines = option_lines(item.question)
    letters = [line.letter for line in lines]
    if len(lines) != 2 or len(set(letters)) != 2:
        raise SwapError(f"item {item.id}: needs exactly two option lines to swap, found {letters or 'none'}")
    first, second = lines
    text = (
        item.question[: first.start]
        + f"{first.indent}({first.letter}){second.text}"
        + item.question[first.end : second.start]
        + f"{second.indent}({second.letter}){first.text}"
        + item.question[second.end :]
    )
    other = {first.letter: second.letter, second.letter: first.letter}
    return ABItem(
        question=text,
        matching=f"({other[item.matching_letter]})",
        not_matching=f"({other[item.not_matching_letter]})",
        id=f"{item.id}{SWAP_SUFFIX}",
    )


def unswapped_id(item_id: str) -> str:
    """The id of the item a mirror was made from (the id itself for an original): an item and its
    mirror are one question, so statistics resample them together."""
    return item_id.removesuffix(SWAP_SUFFIX)


def letter_balanced(items: Sequence[ABItem], *, strict: bool = True) -> list[ABItem]:
    """Every item followed by its mirror, so matching letters are exactly balanced.

    Items that cannot be mirrored (more than two options, as in some survival-instinct rows) raise
    `SwapError` naming the item; with `strict=False` they are kept once, unmirrored, and logged.
    """
    out: list[ABItem] = []
    kept_once: list[str] = []
    for item in items:
        out.append(item)
        try:
            out.append(swap_options(item))
        except SwapError:
            if strict:
                raise
            kept_once.append(item.id)
    if kept_once:
        log.warning(
            "%d of %d items have more than two options and were not mirrored (ids %s%s)",
            len(kept_once), len(items), ", ".join(kept_once[:5]), "…" if len(kept_once) > 5 else "",
        )  # fmt: skip
    return out


Polarity = Literal["yes", "no", "other"]


def option_polarity(item: ABItem, letter: str) -> Polarity:
    """Whether option `letter` of `item` starts with "Yes", "No" or something else."""
    words = re.findall(r"[a-z]+", option_text(item.question, letter).lower())
    first = words[0] if words else ""
    return "yes" if first == "yes" else "no" if first == "no" else "other"


def matching_polarity(item: ABItem) -> Polarity:
    """Whether the behaviour-matching option starts with "Yes", "No" or something else.

    Why: in the CAA/Anthropic behaviour files most matching options are "Yes" (40 of the 50
    coordinate-other-ais test items), so an edit that only makes the model say "Yes" looks like
    steering. Rates split by this polarity tell the two apart: a real behaviour edit also helps the
    items whose matching answer is "No".
    """
    return option_polarity(item, item.matching_letter)


def contrast_row_factors(items: Sequence[ABItem]) -> tuple[list[str], list[Polarity]]:
    """The answer letter and answer polarity of each row of a two-answer contrast set: for every item,
    its matching answer then its other answer (the row order of `ab_contrast_inputs` and of CAA's
    contrast inputs). These are the answer-format factors a balanced direction must not carry."""
    letters: list[str] = []
    polarities: list[Polarity] = []
    for item in items:
        for letter in (item.matching_letter, item.not_matching_letter):
            letters.append(letter)
            polarities.append(option_polarity(item, letter))
    return letters, polarities
