"""Each comparison row's effect, its control and its verdict, from the per-item scores it stored.

For every method of a comparison: the paired change of its A/B scores against the unmodified model
(`ab_effect_vs`: McNemar on the matching answer, sign-flip on p(matching), anti-steerable fraction,
polarity split, and whether a polarity group moves the wrong way: `answer_bias`), against its
matched controls (`ab_effect_vs_controls`: method − control, the headline), the fluency change
against the unmodified model, and the verdict (`effect_verdict`, direction +1: steering is meant to
raise the matching rate). The verdict's p-value is Holm-adjusted over every method compared in the
table; a reliable effect with an answer bias carries it in `caveats`. A method without a control is
judged against the unmodified model and says so. Computed afresh from the stored records, so a
resumed comparison gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finesteer.evaluate.ab import ABResult
from finesteer.evaluate.ab_paired import ab_effect_vs, ab_effect_vs_controls
from finesteer.evaluate.answer_bias import answer_bias, verdict_caveats
from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, effect_verdict
from finesteer.evaluate.stats import PairedEffect, StatsError, holm, paired_effect, seed_spread

__all__ = ["REFERENCE", "REFERENCE_VERDICT", "ab_result", "add_effects"]

REFERENCE = "baseline"
REFERENCE_VERDICT = "reference (unmodified model)"


def ab_result(records: Sequence[Mapping[str, Any]]) -> ABResult:
    """An `ABResult` rebuilt from stored per-item records (id, is_matching, p_matching, polarity)."""
    count = sum(bool(r["is_matching"]) for r in records)
    p = [float(r["p_matching"]) for r in records if "p_matching" in r]
    mean_p = float(np.mean(p)) if records and len(p) == len(records) else None
    n = len(records)
    return ABResult(n, count / n if n else float("nan"), count, mean_p, [dict(r) for r in records])


def _fluency_effect(row: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any] | None:
    a, b = row.get("fluency_per_item"), base.get("fluency_per_item")
    if not a or not b or len(a) != len(b) or None in a or None in b:
        return None
    return paired_effect(a, b, binary=False).to_dict()


def _effects(row: dict[str, Any], base: Mapping[str, Any] | None) -> tuple[PairedEffect | None, str]:
    """Adds vs_baseline / vs_control to `row`; returns the headline effect and what it is against."""
    records = row.get("ab_per_item")
    if not records:
        row["verdict_reason"] = "no per-item A/B scores stored (a result from an older version)"
        return None, "nothing"
    method = ab_result(records)
    headline: PairedEffect | None = None
    against = "nothing"
    if base is not None and base.get("ab_per_item"):
        try:
            vs_base = ab_effect_vs(ab_result(base["ab_per_item"]), method)
        except StatsError as err:
            row["vs_baseline"] = {"reason": str(err)}
        else:
            row["vs_baseline"] = vs_base.to_dict()
            row["answer_bias"] = answer_bias(vs_base)
            headline, against = vs_base.matching, "unmodified model"
        row["fluency_vs_baseline"] = _fluency_effect(row, base)
    control = row.get("control") or {}
    seeds = control.get("seeds") or {}
    if seeds:
        controls = [ab_result(s["ab_per_item"]) for s in seeds.values()]
        try:
            vs_control = ab_effect_vs_controls(controls, method)
        except StatsError as err:
            row["vs_control"] = {"reason": str(err)}
        else:
            row["vs_control"] = vs_control.to_dict()
            row["control_matching_rate"] = seed_spread([c.matching_rate for c in controls])
            headline, against = vs_control.matching, f"control ({control.get('kind')}, {len(seeds)} seeds)"
    return headline, against


def add_effects(results: dict[str, dict[str, Any]], *, direction: int = 1) -> dict[str, dict[str, Any]]:
    """Every row with its paired effects and `verdict` (in place; also returned)."""
    base = results.get(REFERENCE)
    headlines: dict[str, tuple[PairedEffect, str]] = {}
    for name, row in results.items():
        if name == REFERENCE:
            row["verdict"] = {"verdict": REFERENCE_VERDICT, "against": None, "reasons": []}
            continue
        effect, against = _effects(row, base)
        if effect is None:
            reason = row.get("verdict_reason", "no unmodified model or control to compare with")
            row["verdict"] = {"verdict": NO_RELIABLE_EFFECT, "against": None, "reasons": [reason]}
        else:
            headlines[name] = (effect, against)
    adjusted = holm([e.p_value for e, _ in headlines.values()]) if headlines else []
    for (name, (effect, against)), p in zip(headlines.items(), adjusted, strict=True):
        verdict = effect_verdict(effect, direction=direction, adjusted_p=p)
        results[name]["verdict"] = {
            **verdict.to_dict(),
            "against": against,
            "p_value_unadjusted": effect.p_value,
            "adjustment": f"Holm over the {len(headlines)} methods compared",
            "caveats": verdict_caveats(results[name].get("answer_bias"), verdict.label),
        }
        results[name]["headline"] = {
            "against": against,
            "difference": effect.to_dict()["difference"],
            "low": effect.to_dict()["low"],
            "high": effect.to_dict()["high"],
        }
    return results
