"""An intervention's effect on an A/B behaviour: letter-probability matching rate with and without it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finesteer.data.items import ABItem
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel


def ab_effect(
    lm: LoadedModel,
    items: Sequence[ABItem],
    intervention: Intervention | None,
    *,
    system: str | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Matching rate (letter probability) of `items` unmodified vs steered, and the difference."""
    base = ab_matching_rate_prob(lm, items, system=system, batch_size=batch_size)
    steered = ab_matching_rate_prob(
        lm, items, system=system, intervention=intervention, batch_size=batch_size
    )
    return {
        "n": base.n,
        "baseline": base.to_dict(per_item=False),
        "steered": steered.to_dict(per_item=False),
        "delta_matching_rate": steered.matching_rate - base.matching_rate,
    }
