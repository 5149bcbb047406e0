"""Adaptive verification of an attribution estimate, and the bound on the top-k heads it may have missed.

Why: the estimate ranks every head from one forward + backward, but its misses are silent. Here heads
are verified exactly in the estimate's order until the rest provably (under a calibrated error model)
cannot enter the top-k, and the remaining risk is printed as a number.

**Calibration.** Each verified head gives a residual r = g(exact) − g(estimate), with g = log for a
non-negative metric (`space="log"`: KL, whose estimate errs by a factor) and g = identity otherwise
(`space="linear"`: first-order drops of a log-probability or letter margin, which can be negative).
log uses max(x, 1e-30). The n residuals so far have mean μ and sample standard deviation s; a new
head's residual is modelled by the Student-t predictive distribution of one more draw from the same
normal population: (r − μ) / (s·√(1 + 1/n)) ~ t_{n−1}.

**Stop rule.** T_k is the k-th largest exact value among the verified heads. Heads are verified `step`
at a time (the first round max(k, step, 3) heads). Verification stops when the largest estimate e left
unverified satisfies g(e) + μ + t_{c, n−1}·s·√(1 + 1/n) < g(T_k) (c = `confidence`): the estimate plus
its calibrated margin cannot enter the top-k, and no smaller estimate can either. Then `sample` heads
drawn uniformly at random from the unverified ones are verified too; they calibrate the tail that
ordered verification never reaches, and if one of them beats T_k the ordered loop resumes (and samples
again when it stops). `max_verify` caps the number of verified heads (stop reason "budget").

**Bound.** With the final calibration (ordered and sampled heads together), each unverified head j has
q_j = P(exact_j > T_k) = 1 − F_{t, n−1}((g(T_k) − g(e_j) − μ) / (s·√(1 + 1/n))), and

    p = 1 − Π_j (1 − q_j)

is the estimated probability that at least one unverified head belongs in the top-k (heads' residuals
taken as independent). `sample_hits` of `sample_size` is the model-free check: how many randomly
sampled low-ranked heads did beat T_k when verified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy import stats
from torch import Tensor

from finesteer.locate.attribution.metrics import AttributionError

SPACES: tuple[str, ...] = ("log", "linear")
DEFAULT_K = 10
DEFAULT_CONFIDENCE = 0.99
DEFAULT_STEP = 4
DEFAULT_SAMPLE = 4
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class Calibration:
    """Residuals g(exact) − g(estimate) of the verified heads: their mean, s.d. and count."""

    space: str
    mu: float
    sd: float
    n: int

    @classmethod
    def fit(cls, estimate: Sequence[float], exact: Sequence[float], space: str) -> Calibration:
        residuals = [_g(x, space) - _g(e, space) for e, x in zip(estimate, exact, strict=True)]
        n = len(residuals)
        mu = sum(residuals) / n
        sd = math.sqrt(sum((r - mu) ** 2 for r in residuals) / (n - 1)) if n > 1 else math.inf
        return cls(space, mu, sd, n)

    def _scale(self) -> float:
        return self.sd * math.sqrt(1 + 1 / self.n)

    def upper(self, estimate: float, confidence: float) -> float:
        """g-space upper `confidence` prediction bound of the exact value of a head with this estimate."""
        if self.n < 2 or not math.isfinite(self.sd):
            return math.inf
        return _g(estimate, self.space) + self.mu + float(stats.t.ppf(confidence, self.n - 1)) * self._scale()

    def exceed(self, estimate: float, threshold: float) -> float:
        """P(exact > threshold) for a head with this estimate, under the calibrated residual model."""
        gap = _g(threshold, self.space) - _g(estimate, self.space) - self.mu
        if self.n < 2 or not math.isfinite(self.sd):
            return 1.0
        if self.sd == 0:
            return 0.0 if gap >= 0 else 1.0
        return float(stats.t.sf(gap / self._scale(), self.n - 1))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _g(value: float, space: str) -> float:
    return math.log(max(value, LOG_FLOOR)) if space == "log" else float(value)


@dataclass(frozen=True)
class MissBound:
    """How many heads were not verified and the estimated probability that one belongs in the top-k."""

    k: int
    n_unverified: int
    p: float
    threshold: float
    confidence: float
    sample_size: int
    sample_hits: int
    stopped: str
    calibration: Calibration

    def line(self) -> str:
        return (
            f"heads not verified: {self.n_unverified}; estimated probability that one of them belongs in "
            f"the top-{self.k}: {self.p:.3g}"
        )

    def to_dict(self) -> dict[str, Any]:
        c = self.calibration
        return {
            "k": self.k,
            "heads_not_verified": self.n_unverified,
            "p_miss": self.p,
            "threshold": _finite(self.threshold),
            "confidence": self.confidence,
            "sample_size": self.sample_size,
            "sample_hits": self.sample_hits,
            "stopped": self.stopped,
            "calibration": {"space": c.space, "mu": c.mu, "sd": _finite(c.sd), "n": c.n},
            "text": self.line(),
        }


def miss_bound(
    estimate: Sequence[float],
    exact: dict[int, float],
    k: int,
    *,
    space: str = "log",
    confidence: float = DEFAULT_CONFIDENCE,
    sampled: Sequence[int] = (),
    stopped: str = "fixed",
) -> MissBound:
    """The bound (module docstring) for heads `exact` (index → exact value) verified out of `estimate`."""
    if len(exact) < 1:
        raise AttributionError("the bound needs at least one verified head")
    k_eff = min(k, len(exact))
    threshold = sorted(exact.values(), reverse=True)[k_eff - 1]
    calibration = Calibration.fit([estimate[i] for i in exact], list(exact.values()), space)
    log_keep = 0.0
    for j, value in enumerate(estimate):
        if j not in exact:
            log_keep += math.log1p(-min(calibration.exceed(value, threshold), 1.0 - 1e-300))
    hits = sum(1 for i in sampled if exact[i] > _kth_without(exact, i, k_eff))
    return MissBound(
        k=k,
        n_unverified=len(estimate) - len(exact),
        p=0.0 - math.expm1(log_keep),  # 0.0 - x: never -0.0
        threshold=threshold,
        confidence=confidence,
        sample_size=len(sampled),
        sample_hits=hits,
        stopped=stopped,
        calibration=calibration,
    )


def _kth_without(exact: dict[int, float], index: int, k: int) -> float:
    """The k-th best exact value of the other verified heads (−inf when there are fewer than k)."""
    others = sorted((v for i, v in exact.items() if i != index), reverse=True)
    return others[k - 1] if len(others) >= k else -math.inf


@dataclass
class Certificate:
    """Heads verified (in order), their exact values (index → [P] values), the sample and the bound."""

    order: list[int]
    exact: dict[int, Tensor]
    sampled: list[int]
    bound: MissBound
    rounds: list[dict[str, Any]] = field(default_factory=list)


def adaptive_verification(
    estimate: Sequence[float] | Tensor,
    verify: Callable[[list[int]], Tensor],
    k: int = DEFAULT_K,
    *,
    space: str = "log",
    confidence: float = DEFAULT_CONFIDENCE,
    step: int = DEFAULT_STEP,
    sample: int = DEFAULT_SAMPLE,
    max_verify: int | None = None,
    generator: torch.Generator | None = None,
) -> Certificate:
    """Verify heads (flat indices into `estimate`, higher = more important) until the stop rule holds.

    `verify(indices)` returns their exact values, [len] or [len, P] (averaged over P for ranking).
    """
    values = [float(v) for v in (estimate.tolist() if isinstance(estimate, Tensor) else estimate)]
    n = len(values)
    check_settings(n, k, space, confidence, step, sample, max_verify)
    budget = n if max_verify is None else min(max_verify, n)
    ranked = sorted(range(n), key=lambda i: (-values[i], i))
    exact: dict[int, Tensor] = {}
    means: dict[int, float] = {}
    order: list[int] = []
    sampled: list[int] = []
    rounds: list[dict[str, Any]] = []

    def run(indices: list[int]) -> None:
        rows = verify(indices).double().reshape(len(indices), -1)
        for index, row in zip(indices, rows, strict=True):
            exact[index], means[index] = row, float(row.mean())
            order.append(index)

    stopped = "all"
    batch = max(k, step, 3)
    while len(exact) < budget:
        todo = [i for i in ranked if i not in exact]
        if means:
            calibration = Calibration.fit([values[i] for i in means], list(means.values()), space)
            threshold = sorted(means.values(), reverse=True)[min(k, len(means)) - 1]
            margin_upper = calibration.upper(values[todo[0]], confidence)
            rounds.append({"verified": len(exact), "next": todo[0], "upper": margin_upper})
            if len(means) >= k and margin_upper < _g(threshold, space):
                new = _sample(todo, sample, budget - len(exact), generator)
                if not new:
                    stopped = "margin"
                    break
                before = sorted(means.values(), reverse=True)[k - 1]
                run(new)
                sampled.extend(new)
                if all(means[i] <= before for i in new):
                    stopped = "margin"
                    break
                continue  # a sampled head entered the top-k: the estimate is worse than calibrated
        run(todo[: min(batch, budget - len(exact))])
        batch = step
    else:
        stopped = "all" if len(exact) == n else "budget"
    bound = miss_bound(values, means, k, space=space, confidence=confidence, sampled=sampled, stopped=stopped)
    return Certificate(order, exact, sampled, bound, rounds)


def _sample(todo: list[int], count: int, room: int, generator: torch.Generator | None) -> list[int]:
    """Up to `count` (and `room`) heads drawn uniformly without replacement from `todo`."""
    size = min(count, room, len(todo))
    if size <= 0:
        return []
    picks = torch.randperm(len(todo), generator=generator)[:size].tolist()
    return [todo[i] for i in picks]


def check_settings(
    n: int, k: int, space: str, confidence: float, step: int, sample: int, max_verify: int | None
) -> None:
    """Every adaptive-verification setting that needs no model (so commands check before loading)."""
    if space not in SPACES:
        raise AttributionError(f"unknown space '{space}'; choose {' or '.join(SPACES)}")
    if not 0.5 <= confidence < 1:
        raise AttributionError(f"confidence must be in [0.5, 1), got {confidence}")
    if step < 1 or sample < 0:
        raise AttributionError(f"step must be ≥ 1 and sample ≥ 0, got {step} and {sample}")
    if k < 1 or (n and k > n):
        raise AttributionError(f"k must be in 1..{n}, got {k}")
    if max_verify is not None and max_verify < k:
        raise AttributionError(f"max_verify ({max_verify}) must be ≥ k ({k})")
