"""Whether a method's selection found something: the verdict on its chosen setting, on validation only.

Selecting heads, layers or α picks the best of many noisy candidates, and the best of noise looks
like an effect. `selection_verdict` therefore asks: does the chosen candidate beat its matched
control (random heads at the same α for HSI/ITI, a random direction of equal norm for CAA; the
unmodified model when no control was scored), given that it was the best of all candidates tried?

* The family test is `best_of_sweep_null` over every candidate's per-item p(matching) difference
  from its own control (a question and its option-swapped mirror flipped together).
* When the selection's criterion (e.g. the letter-balanced matching rate) chose another candidate
  than the one with the largest mean difference, the chosen one's own p-value is Holm-adjusted over
  all candidates as well; the verdict uses the larger p-value.
* `effect_verdict` then requires that p < 0.05 **and** the chosen candidate's paired 95% interval
  (candidate − control) lies on the intended side of zero. Otherwise the verdict is
  "no reliable effect", said on the terminal and carried in the JSON as `verdict`.

All of it uses the validation split (the test split is scored once, afterwards). The chosen
candidate's change on validation is also split by the matching answer's polarity, with its
anti-steerable fraction (share of items whose p(matching) moved the wrong way).
`sweep_verdict` does the same for a bare head sweep (`locate hsi`): the best single head × α of
every one swept, against the unmodified model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from finesteer.data.balance import unswapped_id
from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, best_of_sweep_null, effect_verdict
from finesteer.evaluate.stats import anti_steerable_fraction, holm, json_number, paired_effect
from finesteer.locate.hsi_table import HsiSweep
from finesteer.locate.selection import SelectionEvidence

log = logging.getLogger(__name__)

VERDICT_RESAMPLES = 2000


def _clusters(ids: Sequence[str]) -> list[str] | None:
    from_ids = [unswapped_id(str(i)) for i in ids]
    return from_ids if len(set(from_ids)) < len(from_ids) else None


def _by_polarity(
    before: np.ndarray, after: np.ndarray, polarities: Sequence[str], direction: int
) -> dict[str, Any]:
    """Change of mean p(matching) and anti-steerable fraction per matching polarity (yes / no / other)."""
    out: dict[str, Any] = {}
    groups = np.array(polarities)
    for name in sorted(set(polarities)):
        mask = groups == name
        anti = anti_steerable_fraction(before[mask], after[mask], direction)
        out[name] = {
            "n": int(mask.sum()),
            "delta_mean_p_matching": json_number(float((after[mask] - before[mask]).mean())),
            "anti_steerable_fraction": anti.to_dict(),
        }
    return out


def selection_verdict(
    evidence: SelectionEvidence,
    *,
    alpha: float = 0.05,
    n_resamples: int = VERDICT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The verdict on a selection's chosen candidate (see the module docstring), JSON-ready.

    Keys: `verdict` (the label), `reference` ("control" or "unmodified"), `effect` (chosen −
    reference on validation), `sweep` (the best-of-sweep null), `holm_p` (when used), the rule and
    reasons, `by_polarity` and `anti_steerable_fraction` of the chosen candidate vs unmodified.
    """
    treated = evidence.p_matching.double().numpy()
    has_control = evidence.control_p is not None
    reference = (
        evidence.control_p.double().numpy()  # type: ignore[union-attr]
        if has_control
        else np.broadcast_to(evidence.baseline_p.double().numpy(), treated.shape)
    )
    clusters = _clusters(evidence.item_ids)
    direction = evidence.direction
    common = {"n_resamples": n_resamples, "seed": seed, "clusters": clusters}
    sweep = best_of_sweep_null(treated, reference, direction=direction, labels=evidence.labels, **common)
    chosen = evidence.chosen_index
    effect = paired_effect(treated[chosen], reference[chosen], binary=False, **common)
    holm_p = None
    if sweep.best_index != chosen:
        p_each = [
            paired_effect(t, r, binary=False, **common).p_value
            for t, r in zip(treated, reference, strict=True)
        ]
        holm_p = holm(p_each)[chosen]
    verdict = effect_verdict(
        effect, direction=direction, alpha=alpha, adjusted_p=holm_p, selection_p=sweep.p_value
    ).to_dict()
    baseline = evidence.baseline_p.double().numpy()
    anti = anti_steerable_fraction(baseline, treated[chosen], direction)
    return {
        "verdict": verdict["verdict"],
        "verdict_details": verdict,
        "reference": "control" if has_control else "unmodified",
        "control": (
            {"kind": evidence.control_kind, "seeds": list(evidence.control_seeds)} if has_control else None
        ),
        "chosen": evidence.labels[chosen],
        "n_candidates": len(evidence.labels),
        "effect": effect.to_dict(),
        "sweep": sweep.to_dict(),
        "holm_p": json_number(holm_p),
        "split": "validation",
        "anti_steerable_fraction": anti.to_dict(),
        "by_polarity": _by_polarity(baseline, treated[chosen], evidence.polarities, direction),
    }


def sweep_verdict(
    sweep: HsiSweep, *, alpha: float = 0.05, n_resamples: int = VERDICT_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Does the best single head × α of a sweep beat the unmodified model, given all those tried?"""
    swept = sweep.swept
    per_item = sweep.per_item[swept].double()  # [n_heads_swept, n_alphas, n_items]
    heads = swept.nonzero().tolist()
    labels = [f"{layer}.{head} α={a:g}" for layer, head in heads for a in sweep.alphas]
    treated = per_item.reshape(-1, per_item.shape[-1]).numpy()
    direction = 1 if sweep.alphas[0] > 0 else -1
    common = {"n_resamples": n_resamples, "seed": seed, "clusters": _clusters(sweep.item_ids)}
    baseline = sweep.baseline_p_matching.double().numpy()
    null = best_of_sweep_null(treated, baseline, direction=direction, labels=labels, **common)
    effect = paired_effect(treated[null.best_index], baseline, binary=False, **common)
    verdict = effect_verdict(effect, direction=direction, alpha=alpha, selection_p=null.p_value).to_dict()
    return {
        "verdict": verdict["verdict"],
        "verdict_details": verdict,
        "reference": "unmodified",
        "best": labels[null.best_index],
        "n_candidates": len(labels),
        "effect": effect.to_dict(),
        "sweep": null.to_dict(),
        "split": "sweep items (held out from the directions)",
    }


def say_verdict(result: dict[str, Any], what: str) -> None:
    """One plain line on the terminal (stderr, through logging): the verdict and why."""
    details = result.get("verdict_details", {})
    reasons = "; ".join(details.get("reasons", []))
    effect = result.get("effect", {})

    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    line = (
        f"{what}: {result['verdict']} ({result['split']}, vs {result['reference']}: "
        f"Δ p(matching) {num(effect.get('difference'), '+.3f')}, "
        f"95% CI [{num(effect.get('low'), '.3f')}, {num(effect.get('high'), '.3f')}], "
        f"p = {num(details.get('p_value'), '.3g')} over {result['n_candidates']} candidates"
        f"{'; ' + reasons if reasons else ''})"
    )
    if result["verdict"] == NO_RELIABLE_EFFECT:
        log.warning(line)
    else:
        log.info(line)


def attach_verdict(metadata: dict[str, Any], evidence: SelectionEvidence | None, what: str) -> None:
    """Add `verdict` (the label) and `selection_verdict` (the numbers) to a fit's metadata, and say it."""
    if evidence is None:
        return
    result = selection_verdict(evidence)
    metadata["verdict"] = result["verdict"]
    metadata["selection_verdict"] = result
    say_verdict(result, what)


__all__ = ["VERDICT_RESAMPLES", "attach_verdict", "say_verdict", "selection_verdict", "sweep_verdict"]
