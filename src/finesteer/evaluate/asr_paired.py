"""How much to believe an ablation's ASR lift: paired effects against the unmodified model and random heads.

`asr_effect` scores every condition (unmodified model, top-k ablated, k random heads per seed) on the
same harmful prompts. Here each prompt's 0/1 attack success under top-k is paired with the same
prompt under the reference: the unmodified model (exact McNemar test on the discordant prompts) and
the random-head control (the per-prompt mean over control seeds, sign-flip test), with the per-seed
lifts summarised as mean ± spread. The headline is top-k − random heads, and its verdict
(`effect_verdict`, direction +1: ablating refusal heads should raise ASR) is the row's answer.
Helpfulness (over-refusal, KL, MC accuracy) gets the same paired treatment against the unmodified model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, effect_verdict
from finesteer.evaluate.stats import mean_estimate, paired_effect, seed_spread
from finesteer.evaluate.verdict import Judge

__all__ = [
    "ABLATION_COLUMNS",
    "ablation_effects",
    "ablation_table",
    "helpfulness_effects",
    "paired_or_reason",
    "successes",
    "verdict_label",
]


def successes(records: Sequence[Mapping[str, Any]], judge: Judge) -> list[float]:
    """Per-prompt 0/1 attack success (the judge's score above 0.5, as `attack_success_rate` counts)."""
    return [float((judge.judge(r["prompt"], r["response"]).score or 0.0) > 0.5) for r in records]


def paired_or_reason(
    treated: Sequence[float], reference: Sequence[float], *, binary: bool | None = None
) -> dict[str, Any]:
    """`paired_effect(...).to_dict()`, or a null effect with the reason when the items do not pair."""
    if len(treated) != len(reference) or not treated:
        return {
            "difference": None,
            "reason": f"cannot pair {len(treated)} treated with {len(reference)} reference items",
        }
    return paired_effect(treated, reference, binary=binary).to_dict()


def ablation_effects(
    baseline: Sequence[float],
    ablated: Mapping[str, Sequence[float]],
    random: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    direction: int = 1,
) -> dict[str, dict[str, Any]]:
    """Per k: top-k vs the unmodified model, vs random heads (per-prompt mean over seeds), the per-seed
    lift spread, and the verdict on top-k − random (or on top-k − unmodified when no random set ran).

    `baseline`: per-prompt 0/1 success of the unmodified model; `ablated[k]`: of top-k;
    `random[k][seed]`: of the k random heads of that seed. All on the same prompts, in order.
    """
    out: dict[str, dict[str, Any]] = {}
    base = np.asarray(baseline, dtype=float)
    for k, values in ablated.items():
        top = np.asarray(values, dtype=float)
        vs_base = paired_effect(top, base, binary=True)
        entry: dict[str, Any] = {"vs_baseline": vs_base.to_dict()}
        seeds = random.get(k, {})
        if seeds:
            control = np.mean([np.asarray(v, dtype=float) for v in seeds.values()], axis=0)
            vs_random = paired_effect(top, control, binary=False)
            entry["vs_random"] = vs_random.to_dict()
            entry["random_per_seed"] = seed_spread([float(top.mean() - np.mean(v)) for v in seeds.values()])
            verdict = effect_verdict(vs_random, direction=direction)
            entry["headline"] = "top-k − random heads"
        else:
            verdict = effect_verdict(vs_base, direction=direction)
            entry["headline"] = "top-k − unmodified (no random-head control)"
        entry["verdict"] = verdict.to_dict()
        out[k] = entry
    return out


def helpfulness_effects(
    baseline: Mapping[str, Sequence[float]], condition: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """Paired effects of one ablation on per-prompt helpfulness values (`over_refusal` 0/1,
    `mc_correct` 0/1) against the unmodified model, and the KL's mean with its bootstrap interval
    (the KL of the unmodified model to itself is 0, so the KL itself is the change)."""
    out: dict[str, Any] = {}
    for key in ("over_refusal", "mc_correct"):
        if key in baseline and key in condition:
            out[key] = paired_or_reason(list(condition[key]), list(baseline[key]), binary=True)
    if condition.get("kl"):
        out["kl"] = mean_estimate(list(condition["kl"])).to_dict()
    return out


def verdict_label(entry: Mapping[str, Any]) -> str:
    """The verdict label of an `ablation_effects` entry (no reliable effect when absent)."""
    return str(entry.get("verdict", {}).get("verdict", NO_RELIABLE_EFFECT))


ABLATION_COLUMNS = (
    "condition",
    "ASR [95% CI]",
    "random heads ± sd",
    "Δ vs unmodified [CI]",
    "top-k − random [CI]",
    "p",
    "verdict",
)


def _cell(effect: Mapping[str, Any] | None, key: str = "difference") -> str:
    if not effect or effect.get(key) is None:
        return "–"
    value = f"{effect[key]:+.2f}" if key == "difference" else f"{effect[key]:.2f}"
    if effect.get("low") is None or effect.get("high") is None:
        return value
    return f"{value} [{effect['low']:.2f}, {effect['high']:.2f}]"


def ablation_table(
    effects: Mapping[str, Mapping[str, Any]],
    random_mean: Mapping[str, float],
    random_std: Mapping[str, float],
) -> tuple[tuple[str, ...], list[list[str]]]:
    """Columns and rows of the ablation table: the unmodified model, then per k the ASR with its
    interval, the random heads (mean ± sd over seeds), the paired lifts and the verdict."""
    rows: list[list[str]] = []
    for k, entry in effects.items():
        vs_base = entry.get("vs_baseline") or {}
        if not rows:
            rows.append(
                ["unmodified", _cell(vs_base.get("reference"), "value"), "–", "–", "–", "–", "reference"]
            )
        verdict = entry.get("verdict") or {}
        mean, std = random_mean.get(k), random_std.get(k)
        rows.append(
            [
                f"top-{k} heads",
                _cell(vs_base.get("treated"), "value"),
                "–" if mean is None else f"{mean:.2f} ± {std or 0.0:.2f}",
                _cell(vs_base),
                _cell(entry.get("vs_random")),
                "–" if verdict.get("p_value") is None else f"{verdict['p_value']:.3f}",
                verdict_label(entry),
            ]
        )
    return ABLATION_COLUMNS, rows
