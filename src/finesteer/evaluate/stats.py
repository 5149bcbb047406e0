"""How much to believe a number: intervals, paired effects and multiple-comparison adjustments.

* `Estimate`: a rate (`rate_estimate`: Wilson or exact Clopper-Pearson interval from
  `scipy.stats.binomtest`) or a mean (`mean_estimate`: percentile bootstrap over items), with n.
* `PairedEffect` (`paired_effect`): a change against the unmodified model or a control scored on the
  same items — the mean per-item difference, a paired bootstrap interval, and a paired test: the
  exact McNemar test (binomial test on the discordant pairs) for 0/1 outcomes, a sign-flip
  permutation test of the mean difference for continuous ones (exact enumeration for small n).
* `anti_steerable_fraction`: the share of items that moved the wrong way (Tan et al. 2024).
* `holm`, `benjamini_hochberg`: adjusted p-values for a family of tests; `seed_spread` summarises a
  control run over several seeds.

Randomness comes only from the `seed` argument (a `numpy.random.Generator` built from it, or one
passed in): the same call gives the same interval, and nothing seeds a process-wide RNG. Items
that are not independent (an A/B question and its mirror) can be given as `clusters`, resampled and
sign-flipped together (`finesteer.evaluate.resampling`). Every `to_dict()` is JSON-ready and never
holds NaN or infinity: an undefined number is null, with a `reason`. Selection over a sweep and the
verdict rule are in `finesteer.evaluate.effect_verdict`; docs/results/statistics.md explains both.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import binomtest, false_discovery_control

from finesteer.evaluate.resampling import (
    Alternative,
    SeedLike,
    StatsError,
    bootstrap_means,
    finite_values,
    percentile_interval,
    rng_from,
    sign_flip_test,
)

__all__ = [
    "ANTI_STEERABLE_TOLERANCE",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "Estimate",
    "PairedEffect",
    "StatsError",
    "anti_steerable_fraction",
    "benjamini_hochberg",
    "holm",
    "json_number",
    "mean_estimate",
    "paired_effect",
    "rate_estimate",
    "seed_spread",
]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples and random sign flips; enough for a 95% interval to ±0.005 in coverage."""

Clusters = Sequence[Hashable] | None


def json_number(value: float | None) -> float | None:
    """A float for JSON: None for None, NaN or ±infinity (JSON has no such numbers)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


# --------------------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A rate or mean of n items with its interval at `confidence` (`method` says which interval).

    `low`/`high` are NaN when no interval can be given (n = 0, or per-item values not kept);
    `reason` then says why.
    """

    value: float
    n: int
    low: float
    high: float
    confidence: float = DEFAULT_CONFIDENCE
    method: str = "wilson"
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": json_number(self.value),
            "n": self.n,
            "low": json_number(self.low),
            "high": json_number(self.high),
            "confidence": self.confidence,
            "method": self.method,
        }
        reason = self.reason
        if reason is None and None in (out["value"], out["low"], out["high"]):
            reason = "undefined (no items)" if self.n == 0 else "undefined"
        if reason is not None:
            out["reason"] = reason
        return out


def rate_estimate(
    count: int,
    n: int,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    method: Literal["wilson", "exact"] = "wilson",
) -> Estimate:
    """`count / n` with a Wilson score (default) or exact Clopper-Pearson interval (scipy's binomtest)."""
    confidence = _check_confidence(confidence)
    if method not in ("wilson", "exact"):
        raise StatsError(f"rate interval method must be 'wilson' or 'exact', got {method!r}")
    count, n = int(count), int(n)
    if n < 0 or count < 0 or count > n:
        raise StatsError(f"a rate needs 0 <= count <= n, got count={count}, n={n}")
    if n == 0:
        return Estimate(math.nan, 0, math.nan, math.nan, confidence, method, "no items")
    ci = binomtest(count, n).proportion_ci(confidence_level=confidence, method=method)
    return Estimate(count / n, n, float(ci.low), float(ci.high), confidence, method)


def mean_estimate(
    values: Sequence[float] | np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
    clusters: Clusters = None,
) -> Estimate:
    """Mean of `values` with a percentile bootstrap interval over items, or over whole clusters of
    items when `clusters` labels them (seeded, so reproducible)."""
    confidence = _check_confidence(confidence)
    x = finite_values(values, "values")
    method = "bootstrap-percentile" if clusters is None else "cluster-bootstrap-percentile"
    if x.size == 0:
        return Estimate(math.nan, 0, math.nan, math.nan, confidence, method, "no items")
    low, high = percentile_interval(bootstrap_means(x, n_resamples, rng_from(seed), clusters), confidence)
    return Estimate(float(x.mean()), int(x.size), low, high, confidence, method)


# --------------------------------------------------------------------------------------------------
# Paired effects
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedEffect:
    """treated − reference on the same n items: mean difference, paired bootstrap interval, paired test.

    `test` is "exact-mcnemar" (binomial test on the discordant pairs, 0/1 outcomes), or
    "sign-flip-permutation" (continuous outcomes, or clustered items of either kind: whole clusters
    flipped); `alternative` its sidedness ("greater": treated above reference). `details` holds the
    discordant counts for 0/1 outcomes and the number of clusters when there are clusters.
    """

    difference: float
    n: int
    low: float
    high: float
    p_value: float
    test: str
    treated: Estimate
    reference: Estimate
    confidence: float = DEFAULT_CONFIDENCE
    alternative: str = "two-sided"
    interval_method: str = "paired-bootstrap-percentile"
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "difference": json_number(self.difference),
            "n": self.n,
            "low": json_number(self.low),
            "high": json_number(self.high),
            "confidence": self.confidence,
            "interval_method": self.interval_method,
            "p_value": json_number(self.p_value),
            "test": self.test,
            "alternative": self.alternative,
            "treated": self.treated.to_dict(),
            "reference": self.reference.to_dict(),
            **self.details,
        }
        if None in (out["difference"], out["low"], out["high"], out["p_value"]):
            out["reason"] = "undefined (no items)" if self.n == 0 else "undefined"
        return out


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.isin(x, (0.0, 1.0)).all())


def paired_effect(
    treated: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    binary: bool | None = None,
    alternative: Alternative = "two-sided",
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
    clusters: Clusters = None,
) -> PairedEffect:
    """The paired effect of `treated` vs `reference` (item i of one paired with item i of the other).

    `binary` (default: both are all 0/1) selects the exact McNemar test; otherwise the sign-flip
    permutation test of the mean difference. The interval is a percentile bootstrap of the mean
    difference over items, whatever the test. `clusters` (one label per item, e.g. an A/B question
    and its mirror share one) makes both resample whole clusters; McNemar, which assumes independent
    pairs, then gives way to the cluster sign-flip test.
    """
    confidence = _check_confidence(confidence)
    if alternative not in ("two-sided", "greater", "less"):
        raise StatsError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    a, b = finite_values(treated, "treated values"), finite_values(reference, "reference values")
    if a.size != b.size:
        raise StatsError(f"paired values need one reference per item: {a.size} treated, {b.size} reference")
    if a.size == 0:
        raise StatsError("a paired effect needs at least one item")
    binary = _is_binary(a) and _is_binary(b) if binary is None else binary
    rng = rng_from(seed)
    d = a - b
    low, high = percentile_interval(bootstrap_means(d, n_resamples, rng, clusters), confidence)
    details: dict[str, Any] = {} if clusters is None else {"n_clusters": len(set(clusters))}
    flip = {"alternative": alternative, "n_resamples": n_resamples, "seed": rng, "clusters": clusters}
    test = "sign-flip-permutation" if clusters is None else "cluster-sign-flip-permutation"
    if binary:
        if not (_is_binary(a) and _is_binary(b)):
            raise StatsError("binary=True needs 0/1 outcomes")
        gained, lost = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        details.update(n_discordant=gained + lost, n_gained=gained, n_lost=lost)
        if clusters is not None:
            p = sign_flip_test(d, **flip)
        else:
            test = "exact-mcnemar"
            p = (
                1.0
                if gained + lost == 0
                else float(binomtest(gained, gained + lost, 0.5, alternative).pvalue)
            )
        treated_est = rate_estimate(int(a.sum()), a.size, confidence)
        reference_est = rate_estimate(int(b.sum()), b.size, confidence)
    else:
        p = sign_flip_test(d, **flip)
        resampling = {"n_resamples": n_resamples, "seed": rng, "clusters": clusters}
        treated_est = mean_estimate(a, confidence, **resampling)
        reference_est = mean_estimate(b, confidence, **resampling)
    interval_method = (
        "paired-bootstrap-percentile" if clusters is None else "paired-cluster-bootstrap-percentile"
    )
    return PairedEffect(
        float(d.mean()), int(d.size), low, high, p, test, treated_est, reference_est,
        confidence, alternative, interval_method, details,
    )  # fmt: skip


ANTI_STEERABLE_TOLERANCE = 1e-6
"""Moves smaller than this (in the score's units, e.g. p(matching)) are float noise, not a direction."""


def anti_steerable_fraction(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    direction: int = 1,
    *,
    tolerance: float = ANTI_STEERABLE_TOLERANCE,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Share of items whose score (e.g. p(matching)) moved against `direction` (+1: steering should
    raise it, −1: lower it) by more than `tolerance`, with its Wilson interval (Tan et al. 2024). The
    default tolerance ignores float32 rounding, so an edit that changes nothing is 0 % anti-steerable
    rather than the ~50 % its last-bit noise would give."""
    if direction not in (1, -1):
        raise StatsError(f"direction must be +1 or -1, got {direction}")
    x, y = finite_values(before, "before values"), finite_values(after, "after values")
    if x.size != y.size:
        raise StatsError(f"before and after need the same items: {x.size} vs {y.size}")
    wrong = int((direction * (y - x) < -tolerance).sum())
    return rate_estimate(wrong, int(x.size), confidence)


# --------------------------------------------------------------------------------------------------
# Families of tests and control seeds
# --------------------------------------------------------------------------------------------------


def _pvalues(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    p = finite_values(p_values, "p-values")
    if ((p < 0) | (p > 1)).any():
        raise StatsError("p-values must lie in [0, 1]")
    return p


def holm(p_values: Sequence[float] | np.ndarray) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error), in the input order."""
    p = _pvalues(p_values)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate; `scipy.stats.false_discovery_control`)."""
    p = _pvalues(p_values)
    return [] if p.size == 0 else np.asarray(false_discovery_control(p, method="bh")).tolist()


def seed_spread(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean ± spread of one number over control seeds: mean, sample std (null for one seed), min, max."""
    x = finite_values(values, "per-seed values")
    if x.size == 0:
        return {"n_seeds": 0, "mean": None, "std": None, "min": None, "max": None, "reason": "no seeds"}
    return {
        "n_seeds": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
    }
