"""A/B items as attribution inputs: each item's scored token sequence and its `LetterMargin` target.

The sequence is the one the A/B scorer reads the letter probabilities at (`scoring.ab.item_target`:
the prompt ending in "(" or, for tokenizers that merge "(A", the prompt before it), so the margin
attributed here is the same number `finesteer eval ab` reports. Both option orders by default: an
item and its mirror, so a head that only moves the answer letter cancels instead of ranking high.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.locate.attribution.metrics import LetterMargin
from finesteer.locate.engine import EncodedPrompts
from finesteer.locate.scores import hash_prompts
from finesteer.models.context import check_prompt_lengths
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, check_items, item_target

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


def ab_attribution_inputs(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    both_orders: bool = True,
    prompt: ABPrompt = DEFAULT_PROMPT,
) -> tuple[EncodedPrompts, LetterMargin, list[str]]:
    """(encoded sequences, the letter-margin metric, item ids) for `items` (mirrored too by default;
    items that cannot be mirrored are kept once)."""
    rows = letter_balanced(check_items(items), strict=False) if both_orders else check_items(items)
    targets = [item_target(lm.tokenizer, item, prompt) for item in rows]
    ids = tuple(tuple(t.tokens) for t in targets)
    check_prompt_lengths(lm, [len(t) for t in ids])
    texts = [prompt.text(lm.tokenizer, item) for item in rows]
    return EncodedPrompts(ids, hash_prompts(texts)), LetterMargin.from_targets(targets), [r.id for r in rows]


__all__ = ["ab_attribution_inputs"]
