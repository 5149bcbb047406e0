"""Seeded resampling over items or clusters of items: the bootstrap and the sign-flip test.

Items that are not independent — an A/B question and its mirror with the options exchanged
(`finesteer.data.balance.swap_options`) — form a cluster: the bootstrap resamples whole clusters
and the sign-flip test flips a whole cluster's differences together, so a question scored in both
orders counts as one independent unit, not two. Without clusters every item is its own cluster.

All randomness comes from a `numpy.random.Generator` (built from an int seed, or passed in); the
same seed gives the same numbers and nothing process-wide is seeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Sequence
from typing import Literal

import numpy as np

from finesteer.errors import FinesteerError

__all__ = [
    "Alternative",
    "SeedLike",
    "StatsError",
    "bootstrap_means",
    "cluster_sums",
    "is_exact",
    "percentile_interval",
    "permutation_p",
    "rng_from",
    "sign_flip_test",
    "sign_flips",
]

Alternative = Literal["two-sided", "greater", "less"]
SeedLike = int | np.random.Generator
CHUNK = 500
"""Resamples per vectorised block, so memory stays O(CHUNK × n)."""


class StatsError(FinesteerError, ValueError):
    """Statistics asked of data that cannot give them (mismatched pairs, bad confidence, NaN)."""


def rng_from(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def finite_values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    """`values` as a flat float64 array; `StatsError` on NaN or infinity (missing items are the
    caller's to drop and report)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise StatsError(f"{what} contain NaN or infinity; drop missing items first and report how many")
    return arr


def cluster_sums(values: np.ndarray, clusters: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of `values` along the last axis and the item count of each cluster
    (clusters in order of first appearance; None: every item alone)."""
    n = values.shape[-1]
    if clusters is None:
        return values, np.ones(n)
    if len(clusters) != n:
        raise StatsError(f"{len(clusters)} cluster labels for {n} items")
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(c, len(index)) for c in clusters])
    membership = np.zeros((n, len(index)))
    membership[np.arange(n), codes] = 1.0
    return values @ membership, membership.sum(axis=0)


def bootstrap_means(
    values: np.ndarray,
    n_resamples: int,
    rng: np.random.Generator,
    clusters: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples of `values` (whole clusters drawn with replacement)."""
    sums, counts = cluster_sums(values, clusters)
    k = sums.size
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, CHUNK):
        stop = min(start + CHUNK, n_resamples)
        idx = rng.integers(0, k, size=(stop - start, k))
        out[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return out


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def is_exact(k: int, n_resamples: int) -> bool:
    """Whether `sign_flips` enumerates every pattern of k units (then p-values need no +1)."""
    return 2**k <= n_resamples


def sign_flips(k: int, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of ±1 rows [b, k]: all 2ᵏ sign patterns when 2ᵏ ≤ `n_resamples` (exact), else
    `n_resamples` random ones."""
    if is_exact(k, n_resamples):
        yield np.array(list(itertools.product((1.0, -1.0), repeat=k)), dtype=np.float64).reshape(2**k, k)
        return
    for start in range(0, n_resamples, CHUNK):
        size = min(CHUNK, n_resamples - start)
        yield rng.integers(0, 2, size=(size, k)) * 2.0 - 1.0


def permutation_p(exceed: int, total: int, exact: bool) -> float:
    """p-value from the number of null statistics at least as extreme as the observed one."""
    return exceed / total if exact else (exceed + 1) / (total + 1)


def tolerance(value: float) -> float:
    """Slack for float rounding when a null statistic ties the observed one."""
    return 1e-12 * max(1.0, abs(value))


def sign_flip_test(
    differences: Sequence[float] | np.ndarray,
    *,
    alternative: Alternative = "two-sided",
    n_resamples: int = 2000,
    seed: SeedLike = 0,
    clusters: Sequence[Hashable] | None = None,
) -> float:
    """p-value of the paired sign-flip permutation test of mean(differences) = 0 (flipping whole
    clusters when given)."""
    d = finite_values(differences, "differences")
    if d.size == 0:
        raise StatsError("a sign-flip test needs at least one item")
    sums, _ = cluster_sums(d, clusters)
    observed = float(d.mean())
    slack = tolerance(observed)
    exceed = total = 0
    for flips in sign_flips(sums.size, n_resamples, rng_from(seed)):
        null = flips @ sums / d.size
        if alternative == "greater":
            exceed += int((null >= observed - slack).sum())
        elif alternative == "less":
            exceed += int((null <= observed + slack).sum())
        else:
            exceed += int((np.abs(null) >= abs(observed) - slack).sum())
        total += flips.shape[0]
    return permutation_p(exceed, total, is_exact(sums.size, n_resamples))
