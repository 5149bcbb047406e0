"""A method's matched controls in a comparison: built by the caller, scored on the same A/B items.

`compare_setups` calls `evaluate_controls` once per method, right after the method itself, so a
control's per-item scores are stored in the method's record and a resumed comparison needs neither
the method nor its controls again. Controls come from `finesteer.fit.controls` (random heads of the
same count at the same α in each head's own σ for head steering, a random direction of equal norm
at the same site for residual vectors, random heads of the same count for ablations); a method
with nothing to match (a system prompt, fine-tuned weights) gets a `reason` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from finesteer.data.items import ABItem
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.fit.controls import Control, ControlError
from finesteer.fit.steering import Steering
from finesteer.scoring.ab import ABPrompt

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

__all__ = ["RECORD_KEYS", "ControlBuilder", "compact_records", "evaluate_controls"]

ControlBuilder = Callable[[Steering, Sequence[int]], list[Control]]
"""(method's steering, control seeds) -> one matched control per seed; raises `ControlError`."""

RECORD_KEYS = ("id", "is_matching", "p_matching", "matching_polarity")
"""What is kept of each A/B item to pair a method with the unmodified model and with its controls."""


def compact_records(per_item: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-item A/B records reduced to `RECORD_KEYS` (what the paired tests read)."""
    return [{key: record[key] for key in RECORD_KEYS if key in record} for record in per_item]


def evaluate_controls(
    setup: Steering,
    reference: LoadedModel,
    ab_items: Sequence[ABItem],
    make_controls: ControlBuilder | None,
    n_seeds: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """The A/B letter-probability scores of `n_seeds` matched controls of `setup` (same model, same
    system prompt), or `n_seeds: 0` and the reason there are none."""
    if n_seeds == 0:
        return {"n_seeds": 0, "reason": "controls off (--controls 0)"}
    if make_controls is None:
        return {"n_seeds": 0, "reason": "no control builder given"}
    if setup.intervention is None:
        return {"n_seeds": 0, "reason": "no intervention to match (a system prompt, or other weights)"}
    try:
        controls = make_controls(setup, tuple(range(n_seeds)))
    except ControlError as err:
        return {"n_seeds": 0, "reason": str(err)}
    lm = setup.lm if setup.lm is not None else reference
    seeds: dict[str, Any] = {}
    for control in controls:
        prob = ab_matching_rate_prob(
            lm,
            ab_items,
            prompt=ABPrompt(setup.system_prompt),
            intervention=control.intervention,
            batch_size=batch_size,
            progress=progress,
        )
        seeds[str(control.seed)] = {
            "name": control.name,
            "heads": [f"{layer}.{head}" for layer, head in control.heads],
            "ab_matching_rate": prob.matching_rate,
            "ab_mean_p_matching": prob.mean_p_matching,
            "ab_per_item": compact_records(prob.per_item),
        }
    return {"kind": controls[0].kind, "n_seeds": len(controls), "seeds": seeds}
