"""How much of a reference intervention's effect another one reaches. On the refusal frontier the
reference is directional ablation, and the question is what share of its ASR gain a few heads carry:
(ȳ_point − ȳ_base) / (ȳ_ref − ȳ_base), on the same prompts, with a paired percentile bootstrap (one
resample of prompts feeds all three means). Resamples where the reference gains nothing are dropped
and counted; the interval is withheld, with its reason, when more than 5 % of them are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finesteer.evaluate.resampling import finite_values, percentile_interval, rng_from
from finesteer.evaluate.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, Estimate, StatsError

METHOD = "paired-bootstrap-percentile-ratio"


def share_of_gain(
    treated: Sequence[float],
    reference: Sequence[float],
    base: Sequence[float],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """(mean(treated) − mean(base)) / (mean(reference) − mean(base)) over the same n items."""
    t = finite_values(treated, "treated outcomes")
    r = finite_values(reference, "reference outcomes")
    b = finite_values(base, "base outcomes")
    if not t.size == r.size == b.size:
        raise StatsError(f"the three outcomes need the same items: {t.size}, {r.size}, {b.size}")
    n = int(t.size)
    gain = float(r.mean() - b.mean()) if n else 0.0
    if gain == 0.0:
        return Estimate(float("nan"), n, float("nan"), float("nan"), confidence, METHOD,
                        reason="the reference changes nothing on these items")  # fmt: skip
    idx = rng_from(seed).integers(0, n, size=(n_resamples, n))
    num, den = t[idx].mean(1) - b[idx].mean(1), r[idx].mean(1) - b[idx].mean(1)
    ok = den != 0
    value = float(t.mean() - b.mean()) / gain
    if ok.mean() < 0.95:
        why = f"the reference's gain is zero in {1 - ok.mean():.0%} of resamples"
        return Estimate(value, n, float("nan"), float("nan"), confidence, METHOD, reason=why)
    low, high = percentile_interval(num[ok] / den[ok], confidence)
    return Estimate(value, n, low, high, confidence, METHOD)


def add_shares(
    rows: Sequence[dict[str, Any]],
    y: Mapping[str, Sequence[float]],
    base_id: str,
    reference_id: str,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> None:
    """Give every non-baseline, non-reference row (in place) `share_of_reference`: its share of the
    reference point's change of y, with the reference's id."""
    for row in rows:
        if row["kind"] == "baseline" or row["id"] == reference_id:
            continue
        est = share_of_gain(y[row["id"]], y[reference_id], y[base_id], confidence=confidence, seed=seed)
        row["share_of_reference"] = {**est.to_dict(), "reference": reference_id}


__all__ = ["add_shares", "share_of_gain"]
