"""A verdict for every point of a refusal frontier: does it move y beyond what its control does?

A point with matched controls (the top-k heads of a ranking vs k random heads per seed; a vector at
λ vs random directions of the same norm at λ) is paired prompt by prompt with the per-prompt mean of
its controls' y (sign-flip test). Random heads spend the same budget for any ranking, so the top-k of
a ranking that has no controls of its own (only the first ranking gets them) is judged against the
random k-head controls of another ranking. A point without any control (a directional ablation, a
system prompt) is paired with the unmodified model (exact McNemar test on the prompts that changed).
All points are one family: their p-values are Holm-adjusted together, and `effect_verdict`
(direction +1: y is defined so that the intervention's goal raises it) labels each. The controls
themselves get no verdict — they are what the points are judged against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, effect_verdict
from finesteer.evaluate.stats import DEFAULT_CONFIDENCE, PairedEffect, holm, paired_effect

__all__ = ["add_point_verdicts", "controlled_series"]

# A control series' name → the series it controls (`evaluate.frontier_entries` names them so).
_CONTROL_PREFIXES = (("random-direction:", ""), ("random:", "top:"))


def controlled_series(control_series: str) -> str | None:
    """The method series a control series stands beside: `random:X` → `top:X` (head ablations),
    `random-direction:X` → `X` (vectors); None for another name."""
    for prefix, replacement in _CONTROL_PREFIXES:
        if control_series.startswith(prefix):
            return replacement + control_series[len(prefix) :]
    return None


_ANY_HEADS = "top:*"


def _control_means(
    rows: Sequence[Mapping[str, Any]], y: Mapping[str, Sequence[float]]
) -> dict[tuple[str, float], tuple[list[float], int]]:
    """Per (controlled series, strength): the per-prompt mean of y over the control seeds, and their
    count; random-head controls are also pooled per size under ("top:*", k)."""
    groups: dict[tuple[str, float], list[Sequence[float]]] = {}
    for row in rows:
        target = controlled_series(row["series"]) if row["kind"] == "control" else None
        if target is not None:
            groups.setdefault((target, float(row["strength"])), []).append(y[row["id"]])
            if target.startswith("top:"):
                groups.setdefault((_ANY_HEADS, float(row["strength"])), []).append(y[row["id"]])
    return {key: (np.mean(np.asarray(g, float), axis=0).tolist(), len(g)) for key, g in groups.items()}


def _control_of(
    row: Mapping[str, Any], controls: Mapping[tuple[str, float], tuple[list[float], int]]
) -> tuple[list[float], int] | None:
    strength = float(row["strength"])
    own = controls.get((row["series"], strength))
    if own is None and str(row["series"]).startswith("top:"):
        return controls.get((_ANY_HEADS, strength))
    return own


def add_point_verdicts(
    rows: Sequence[dict[str, Any]],
    y: Mapping[str, Sequence[float]],
    base_id: str | None,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> None:
    """Give every method point (in place) `vs_control` when it has controls and `verdict`: against
    its controls, else against the unmodified model (`base_id`), Holm-adjusted over all points."""
    controls = _control_means(rows, y)
    tested: list[tuple[dict[str, Any], PairedEffect, str]] = []
    for row in rows:
        if row["kind"] != "method":
            continue
        control = _control_of(row, controls)
        if control is not None:
            mean, n_seeds = control
            effect = paired_effect(y[row["id"]], mean, binary=False, confidence=confidence, seed=seed)
            row["vs_control"] = {**effect.to_dict(), "n_seeds": n_seeds}
            tested.append((row, effect, f"control (random, {n_seeds} seed{'s' * (n_seeds != 1)})"))
        elif base_id is not None:
            effect = paired_effect(y[row["id"]], y[base_id], confidence=confidence, seed=seed)
            tested.append((row, effect, "unmodified model"))
        else:
            row["verdict"] = {"verdict": NO_RELIABLE_EFFECT, "against": None,
                              "reasons": ["no unmodified model or control to compare with"]}  # fmt: skip
    adjusted = holm([effect.p_value for _, effect, _ in tested]) if tested else []
    for (row, effect, against), p in zip(tested, adjusted, strict=True):
        row["verdict"] = {
            **effect_verdict(effect, direction=1, adjusted_p=p).to_dict(),
            "against": against,
            "p_value_unadjusted": effect.p_value,
            "adjustment": f"Holm over the {len(tested)} points compared",
        }
