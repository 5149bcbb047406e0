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
passed in): the same call gives the same interval, and nothing seeds a process-wide RNG. Every
`to_dict()` is JSON-ready and never holds NaN or infinity: an undefined number is null, with a
`reason`. Selection over a sweep and the verdict rule are in `finesteer.evaluate.effect_verdict`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import binomtest, false_discovery_control

from finesteer.errors import FinesteerError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "Estimate",
    "PairedEffect",
    "StatsError",
    "anti_steerable_fraction",
    "benjamini_hochberg",
    "holm",
    "mean_estimate",
    "paired_effect",
    "rate_estimate",
    "seed_spread",
]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples and random sign flips; enough for a 95% interval to ±0.005 in coverage."""

Alternative = Literal["two-sided", "greater", "less"]
SeedLike = int | np.random.Generator
_CHUNK = 500  # resamples per vectorised block, so memory stays O(_CHUNK × n)


class StatsError(FinesteerError, ValueError):
    """Statistics asked of data that cannot give them (mismatched pairs, bad confidence, NaN)."""


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


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise StatsError(f"{what} contain NaN or infinity; drop missing items first and report how many")
    return arr


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


def _bootstrap_means(x: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement, same size) of x."""
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        stop = min(start + _CHUNK, n_resamples)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_estimate(
    values: Sequence[float] | np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> Estimate:
    """Mean of `values` with a percentile bootstrap interval over items (seeded, so reproducible)."""
    confidence = _check_confidence(confidence)
    x = _values(values, "values")
    if x.size == 0:
        return Estimate(math.nan, 0, math.nan, math.nan, confidence, "bootstrap-percentile", "no items")
    low, high = _percentile_interval(_bootstrap_means(x, n_resamples, _rng(seed)), confidence)
    return Estimate(float(x.mean()), int(x.size), low, high, confidence, "bootstrap-percentile")


# --------------------------------------------------------------------------------------------------
# Paired effects
# --------------------------------------------------------------------------------------------------


def sign_flips(n: int, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of ±1 rows [b, n]: every one of the 2ⁿ sign patterns when 2ⁿ ≤ `n_resamples`
    (an exact test), else `n_resamples` random ones."""
    if 2**n <= n_resamples:
        patterns = np.array(list(itertools.product((1.0, -1.0), repeat=n)), dtype=np.float64)
        yield patterns.reshape(2**n, n)
        return
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        yield rng.choice(np.array([1.0, -1.0]), size=(size, n))


def is_exact(n: int, n_resamples: int) -> bool:
    """Whether `sign_flips` enumerates every pattern (then p-values need no +1 correction)."""
    return 2**n <= n_resamples


def permutation_p(exceed: int, total: int, exact: bool) -> float:
    """p-value from the number of null statistics at least as extreme as the observed one."""
    return exceed / total if exact else (exceed + 1) / (total + 1)


def _tolerance(value: float) -> float:
    return 1e-12 * max(1.0, abs(value))


def sign_flip_test(
    differences: np.ndarray,
    *,
    alternative: Alternative = "two-sided",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: SeedLike = 0,
) -> float:
    """p-value of the paired sign-flip permutation test of mean(differences) = 0."""
    d = _values(differences, "differences")
    observed = float(d.mean())
    rng = _rng(seed)
    exceed = total = 0
    for flips in sign_flips(d.size, n_resamples, rng):
        null = flips @ d / d.size
        if alternative == "greater":
            exceed += int((null >= observed - _tolerance(observed)).sum())
        elif alternative == "less":
            exceed += int((null <= observed + _tolerance(observed)).sum())
        else:
            exceed += int((np.abs(null) >= abs(observed) - _tolerance(observed)).sum())
        total += flips.shape[0]
    return permutation_p(exceed, total, is_exact(d.size, n_resamples))


@dataclass(frozen=True)
class PairedEffect:
    """treated − reference on the same n items: mean difference, paired bootstrap interval, paired test.

    `test` is "exact-mcnemar" (binomial test on the discordant pairs, 0/1 outcomes) or
    "sign-flip-permutation" (continuous outcomes); `alternative` its sidedness ("greater": treated
    above reference). `details` holds the discordant counts for McNemar.
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
) -> PairedEffect:
    """The paired effect of `treated` vs `reference` (item i of one paired with item i of the other).

    `binary` (default: both are all 0/1) selects the exact McNemar test; otherwise the sign-flip
    permutation test of the mean difference. The interval is a percentile bootstrap of the mean
    difference over items, whatever the test.
    """
    confidence = _check_confidence(confidence)
    if alternative not in ("two-sided", "greater", "less"):
        raise StatsError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    a, b = _values(treated, "treated values"), _values(reference, "reference values")
    if a.size != b.size:
        raise StatsError(f"paired values need one reference per item: {a.size} treated, {b.size} reference")
    if a.size == 0:
        raise StatsError("a paired effect needs at least one item")
    binary = _is_binary(a) and _is_binary(b) if binary is None else binary
    rng = _rng(seed)
    d = a - b
    low, high = _percentile_interval(_bootstrap_means(d, n_resamples, rng), confidence)
    details: dict[str, Any] = {}
    if binary:
        if not (_is_binary(a) and _is_binary(b)):
            raise StatsError("binary=True needs 0/1 outcomes")
        gained, lost = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        details = {"n_discordant": gained + lost, "n_gained": gained, "n_lost": lost}
        p = 1.0 if gained + lost == 0 else float(binomtest(gained, gained + lost, 0.5, alternative).pvalue)
        test, treated_est = "exact-mcnemar", rate_estimate(int(a.sum()), a.size, confidence)
        reference_est = rate_estimate(int(b.sum()), b.size, confidence)
    else:
        p = sign_flip_test(d, alternative=alternative, n_resamples=n_resamples, seed=rng)
        test = "sign-flip-permutation"
        treated_est = mean_estimate(a, confidence, n_resamples=n_resamples, seed=rng)
        reference_est = mean_estimate(b, confidence, n_resamples=n_resamples, seed=rng)
    return PairedEffect(
        float(d.mean()), int(d.size), low, high, p, test, treated_est, reference_est,
        confidence, alternative, details=details,
    )  # fmt: skip


def anti_steerable_fraction(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    direction: int = 1,
    *,
    tolerance: float = 0.0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Estimate:
    """Share of items whose score (e.g. p(matching)) moved against `direction` (+1: steering should
    raise it, −1: lower it) by more than `tolerance`, with its Wilson interval (Tan et al. 2024)."""
    if direction not in (1, -1):
        raise StatsError(f"direction must be +1 or -1, got {direction}")
    x, y = _values(before, "before values"), _values(after, "after values")
    if x.size != y.size:
        raise StatsError(f"before and after need the same items: {x.size} vs {y.size}")
    wrong = int((direction * (y - x) < -tolerance).sum())
    return rate_estimate(wrong, int(x.size), confidence)


# --------------------------------------------------------------------------------------------------
# Families of tests and control seeds
# --------------------------------------------------------------------------------------------------


def _pvalues(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    p = _values(p_values, "p-values")
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
    x = _values(values, "per-seed values")
    if x.size == 0:
        return {"n_seeds": 0, "mean": None, "std": None, "min": None, "max": None, "reason": "no seeds"}
    return {
        "n_seeds": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
    }
