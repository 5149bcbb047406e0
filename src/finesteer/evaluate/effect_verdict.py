"""Whether an effect is real: the selection-aware null of a sweep and the verdict rule.

`best_of_sweep_null` answers "does the best configuration beat the reference, given that we picked
the best of N?". Picking the maximum of many noisy effects inflates it (the winner's curse), so the
best configuration's own paired test is too optimistic. The null here flips the sign of each item's
differences *jointly across every configuration swept* (the items are exchangeable under "no
configuration changes anything", and configurations scored on the same item stay correlated) and
recomputes the best statistic each time; the p-value is the share of flips whose best is at least
the observed best.

`effect_verdict` turns a `PairedEffect` (method − control, or steered − unmodified) into one of
three plain labels. The rule, at level `alpha` (default 0.05):

* "reliable effect": the p-value (adjusted for multiple comparisons when given, and not smaller than
  the selection-aware p-value when given) is below `alpha`, AND the paired interval lies entirely on
  the intended side of zero;
* "effect in the wrong direction": the same p-value is below `alpha` and the interval lies entirely
  on the other side;
* "no reliable effect": anything else, including an undefined p-value or interval.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from finesteer.evaluate.resampling import (
    SeedLike,
    StatsError,
    cluster_sums,
    is_exact,
    permutation_p,
    rng_from,
    sign_flips,
    tolerance,
)
from finesteer.evaluate.stats import DEFAULT_RESAMPLES, PairedEffect, json_number

__all__ = [
    "EFFECT_LABELS",
    "NO_RELIABLE_EFFECT",
    "RELIABLE_EFFECT",
    "WRONG_DIRECTION",
    "EffectVerdict",
    "SweepNull",
    "best_of_sweep_null",
    "effect_verdict",
]

RELIABLE_EFFECT = "reliable effect"
NO_RELIABLE_EFFECT = "no reliable effect"
WRONG_DIRECTION = "effect in the wrong direction"
EFFECT_LABELS = (RELIABLE_EFFECT, NO_RELIABLE_EFFECT, WRONG_DIRECTION)

VERDICT_RULE = (
    "reliable effect: p < {alpha} (adjusted for every comparison made, and no smaller than the "
    "best-of-sweep p-value when a selection was made) and the {confidence:.0%} paired interval of the "
    "difference excludes 0 on the intended side; effect in the wrong direction: the same p < {alpha} "
    "with the interval on the other side; otherwise no reliable effect"
)


# --------------------------------------------------------------------------------------------------
# Best of a sweep
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepNull:
    """The best configuration of a sweep and how surprising its statistic is.

    `p_value` accounts for having picked the best of `n_configs`; `naive_p_value` is the one-sided
    sign-flip p-value of the best configuration alone, as if it had been chosen in advance (always
    ≤ `p_value`, computed on the same sign flips).
    """

    best_index: int
    best_label: str | None
    best_statistic: float
    p_value: float
    naive_p_value: float
    n_configs: int
    n: int
    n_resamples: int
    statistic: str
    direction: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_index": self.best_index,
            "best_label": self.best_label,
            "best_statistic": json_number(self.best_statistic),
            "p_value": json_number(self.p_value),
            "naive_p_value": json_number(self.naive_p_value),
            "n_configs": self.n_configs,
            "n": self.n,
            "n_resamples": self.n_resamples,
            "statistic": self.statistic,
            "direction": self.direction,
            "test": "best-of-sweep sign-flip permutation",
        }


def _statistics(sums: np.ndarray, squares: np.ndarray, n: int, statistic: str) -> np.ndarray:
    """Per-configuration mean, or t = mean / (sd/√n), from per-configuration sums (…, C)."""
    means = sums / n
    if statistic == "mean":
        return means
    variance = np.maximum(squares / n - means**2, 0.0) * n / max(n - 1, 1)
    scale = np.sqrt(variance / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale > 0, means / np.where(scale > 0, scale, 1.0), 0.0)
    return t


def best_of_sweep_null(
    treated: Sequence[Sequence[float]] | np.ndarray,
    reference: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    *,
    direction: int = 1,
    statistic: Literal["mean", "t"] = "mean",
    labels: Sequence[str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
    clusters: Sequence[Hashable] | None = None,
) -> SweepNull:
    """Selection-aware test of the best of a sweep against a reference on the same items.

    `treated` is [n_configs, n_items] (e.g. every head × α tried); `reference` the reference's
    scores per item ([n_items]: the unmodified model or one control for all) or per configuration
    ([n_configs, n_items]: a matched control for each). The best configuration maximises
    `direction` × statistic of (treated − reference): the mean difference, or its t statistic
    (`statistic="t"`, fairer when configurations differ in noise). `clusters` labels items that
    are flipped together (an A/B question and its mirror).
    """
    if direction not in (1, -1):
        raise StatsError(f"direction must be +1 or -1, got {direction}")
    if statistic not in ("mean", "t"):
        raise StatsError(f"statistic must be 'mean' or 't', got {statistic!r}")
    a = np.asarray(treated, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise StatsError(f"treated must be [n_configs, n_items] with both ≥ 1, got shape {a.shape}")
    try:
        d = direction * (a - np.asarray(reference, dtype=np.float64))
    except ValueError as err:
        raise StatsError(f"reference does not match treated {a.shape}: {err}") from None
    if d.shape != a.shape or not np.isfinite(d).all():
        raise StatsError(f"reference must be [n_items] or {a.shape}, without NaN; got {np.shape(reference)}")
    if labels is not None and len(labels) != a.shape[0]:
        raise StatsError(f"{len(labels)} labels for {a.shape[0]} configurations")
    n_configs, n = d.shape
    squares = (d**2).sum(axis=1)
    observed = _statistics(d.sum(axis=1), squares, n, statistic)
    best = int(np.argmax(observed))
    best_value = float(observed[best])
    slack = tolerance(best_value)
    sums, _ = cluster_sums(d, clusters)  # [n_configs, n_units]: flipping a unit flips all its items
    exceed_best = exceed_naive = total = 0
    for flips in sign_flips(sums.shape[1], n_resamples, rng_from(seed)):
        null = _statistics(flips @ sums.T, squares, n, statistic)  # [b, n_configs]
        exceed_best += int((null.max(axis=1) >= best_value - slack).sum())
        exceed_naive += int((null[:, best] >= best_value - slack).sum())
        total += flips.shape[0]
    exact = is_exact(sums.shape[1], n_resamples)
    return SweepNull(
        best_index=best,
        best_label=None if labels is None else str(labels[best]),
        best_statistic=best_value,
        p_value=permutation_p(exceed_best, total, exact),
        naive_p_value=permutation_p(exceed_naive, total, exact),
        n_configs=n_configs,
        n=n,
        n_resamples=total,
        statistic=statistic,
        direction=direction,
    )


# --------------------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectVerdict:
    """One of `EFFECT_LABELS` for an effect, the p-value and interval it rests on, and why."""

    label: str
    p_value: float | None
    difference: float
    low: float
    high: float
    direction: int
    alpha: float
    rule: str
    reasons: list[str] = field(default_factory=list)

    @property
    def reliable(self) -> bool:
        return self.label == RELIABLE_EFFECT

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.label,
            "p_value": json_number(self.p_value),
            "difference": json_number(self.difference),
            "low": json_number(self.low),
            "high": json_number(self.high),
            "direction": self.direction,
            "alpha": self.alpha,
            "rule": self.rule,
            "reasons": list(self.reasons),
        }


def effect_verdict(
    effect: PairedEffect,
    *,
    direction: int = 1,
    alpha: float = 0.05,
    adjusted_p: float | None = None,
    selection_p: float | None = None,
) -> EffectVerdict:
    """The verdict on `effect` (treated − reference) for an edit meant to move the score in `direction`.

    `adjusted_p`: the effect's p-value after a Holm/BH adjustment over the family it belongs to
    (default: its own p-value). `selection_p`: the `best_of_sweep_null` p-value when the treated
    configuration was picked from a sweep; the verdict uses the larger of the two.
    """
    if direction not in (1, -1):
        raise StatsError(f"direction must be +1 or -1, got {direction}")
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must be in (0, 1), got {alpha}")
    candidates = [effect.p_value if adjusted_p is None else adjusted_p]
    if selection_p is not None:
        candidates.append(selection_p)
    defined = [float(p) for p in candidates if p is not None and math.isfinite(float(p))]
    p = max(defined) if len(defined) == len(candidates) else None
    rule = VERDICT_RULE.format(alpha=alpha, confidence=effect.confidence)
    reasons: list[str] = []
    low, high = direction * effect.low, direction * effect.high
    interval_defined = math.isfinite(low) and math.isfinite(high)
    if p is None:
        reasons.append("p-value undefined")
    elif p >= alpha:
        reasons.append(f"p = {p:.3g} ≥ {alpha}")
    if not interval_defined:
        reasons.append("interval undefined")
    elif min(low, high) <= 0.0 <= max(low, high):
        reasons.append(
            f"the {effect.confidence:.0%} interval [{effect.low:.3g}, {effect.high:.3g}] includes 0"
        )
    if reasons:
        label = NO_RELIABLE_EFFECT
    elif min(low, high) > 0:
        label = RELIABLE_EFFECT
    else:
        label = WRONG_DIRECTION
        reasons.append("the change is opposite to the intended direction")
    return EffectVerdict(
        label, p, effect.difference, effect.low, effect.high, direction, alpha, rule, reasons
    )
