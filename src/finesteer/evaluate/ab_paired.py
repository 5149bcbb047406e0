"""The change between two A/B results on the same items: paired effects, anti-steerability, polarity.

`ab_effect_vs(reference, other)` pairs the per-item records of two `ABResult`s by item id (the
unmodified model or a control as `reference`, the steered model as `other`) and returns an
`ABComparison`: the paired effect on "answers the matching option" (exact McNemar test) and on
p(matching) (sign-flip test; letter-probability results only), the anti-steerable fraction (share of
items whose p(matching) moved against the intended direction), and the same split by the matching
answer's polarity (Yes / No / other), where a pure "Yes" bias shows as a gain on one group and a loss
on the other. `ab_effect_vs_controls(controls, method)` does the same against a method's matched
controls (one result per control seed): the headline effect, method − control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finesteer.evaluate.ab import ABResult, mirror_clusters
from finesteer.evaluate.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Estimate,
    PairedEffect,
    StatsError,
    anti_steerable_fraction,
    json_number,
    paired_effect,
    seed_spread,
)

__all__ = ["ABComparison", "ControlComparison", "ab_effect_vs", "ab_effect_vs_controls"]


@dataclass(frozen=True)
class ABComparison:
    """`other` − `reference` on the n items both scored (see the module docstring)."""

    n: int
    matching: PairedEffect
    p_matching: PairedEffect | None
    anti_steerable: Estimate | None
    by_polarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    direction: int = 1
    polarity_effects: dict[str, PairedEffect] = field(default_factory=dict)
    """Per matching polarity: the paired effect on "answers the matching option" (`answer_bias`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "direction": self.direction,
            "matching": self.matching.to_dict(),
            "p_matching": None if self.p_matching is None else self.p_matching.to_dict(),
            "anti_steerable_fraction": None if self.anti_steerable is None else self.anti_steerable.to_dict(),
            "by_matching_polarity": self.by_polarity,
        }


def _records(result: ABResult, which: str) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for i, record in enumerate(result.per_item):
        if "id" not in record:
            raise StatsError(f"{which} result: per-item record {i} has no item id to pair on")
        if record["id"] in records:
            raise StatsError(f"{which} result: item id {record['id']!r} appears twice; cannot pair items")
        records[str(record["id"])] = record
    return records


def _paired_records(
    reference: ABResult, other: ABResult
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The two results' per-item records in the reference's item order; both must hold the same ids.

    Two results listing the same ids in the same order pair by position (so a data file that repeats
    an id still compares with itself); otherwise ids must be unique, and pair by id.
    """
    ids_ref = [r.get("id") for r in reference.per_item]
    if reference.per_item and None not in ids_ref and ids_ref == [r.get("id") for r in other.per_item]:
        return list(reference.per_item), list(other.per_item)
    ref, oth = _records(reference, "reference"), _records(other, "other")
    if set(ref) != set(oth):
        only_ref, only_other = sorted(set(ref) - set(oth)), sorted(set(oth) - set(ref))
        raise StatsError(
            f"the two A/B results were scored on different items (only in reference: {only_ref[:3]}, "
            f"only in other: {only_other[:3]}); compare results on the same items"
        )
    if not ref:
        raise StatsError("no items to compare")
    return list(ref.values()), [oth[i] for i in ref]


def _p_matching(records: list[dict[str, Any]]) -> np.ndarray | None:
    if not all("p_matching" in r for r in records):
        return None
    return np.array([float(r["p_matching"]) for r in records])


def _group_summary(
    before: list[dict[str, Any]], after: list[dict[str, Any]], direction: int, confidence: float
) -> dict[str, Any]:
    was = np.array([bool(r["is_matching"]) for r in before], dtype=float)
    now = np.array([bool(r["is_matching"]) for r in after], dtype=float)
    summary: dict[str, Any] = {
        "n": len(before),
        "matching_rate_reference": float(was.mean()),
        "matching_rate_other": float(now.mean()),
        "delta_matching_rate": float(now.mean() - was.mean()),
    }
    p_before, p_after = _p_matching(before), _p_matching(after)
    if p_before is not None and p_after is not None:
        summary["delta_mean_p_matching"] = json_number(float((p_after - p_before).mean()))
        anti = anti_steerable_fraction(p_before, p_after, direction, confidence=confidence)
        summary["anti_steerable_fraction"] = anti.to_dict()
    return summary


def ab_effect_vs(
    reference: ABResult,
    other: ABResult,
    *,
    direction: int = 1,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> ABComparison:
    """Paired effect of `other` vs `reference` (same items, paired by id; both id sets must match).

    `direction` +1 means `other` is meant to raise the matching rate (−1: lower it); it decides which
    way counts as anti-steerable. Tests are two-sided; `effect_verdict` applies the direction. When
    the items include option-swapped mirrors, a question and its mirror are resampled and flipped
    together (cluster bootstrap and cluster sign-flip test instead of McNemar).
    """
    before, after = _paired_records(reference, other)
    was = [float(bool(r["is_matching"])) for r in before]
    now = [float(bool(r["is_matching"])) for r in after]
    clusters = mirror_clusters(before)
    kwargs: dict[str, Any] = {
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "clusters": clusters,
    }
    matching = paired_effect(now, was, binary=True, **kwargs)
    p_before, p_after = _p_matching(before), _p_matching(after)
    p_effect = anti = None
    if p_before is not None and p_after is not None:
        p_effect = paired_effect(p_after, p_before, binary=False, **kwargs)
        anti = anti_steerable_fraction(p_before, p_after, direction, confidence=confidence)
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(before):
        groups.setdefault(str(record.get("matching_polarity", "unknown")), []).append(i)
    by_polarity: dict[str, dict[str, Any]] = {}
    polarity_effects: dict[str, PairedEffect] = {}
    for name, idx in sorted(groups.items()):
        was_group, now_group = [before[i] for i in idx], [after[i] for i in idx]
        by_polarity[name] = _group_summary(was_group, now_group, direction, confidence)
        polarity_effects[name] = paired_effect(
            [now[i] for i in idx],
            [was[i] for i in idx],
            binary=True,
            **{**kwargs, "clusters": mirror_clusters(was_group)},
        )
        by_polarity[name]["matching"] = polarity_effects[name].to_dict()
    return ABComparison(len(before), matching, p_effect, anti, by_polarity, direction, polarity_effects)


@dataclass(frozen=True)
class ControlComparison:
    """A method's A/B result against its matched controls (one result per control seed).

    `matching` and `p_matching` are paired effects of the method against the per-item mean of the
    controls (so the control's seed noise is averaged before pairing; sign-flip tests, since a
    mean over seeds is no longer 0/1); `per_seed` is the method − control difference of the matching
    rate and of mean p(matching) for each seed, summarised as mean ± spread.
    """

    n: int
    n_seeds: int
    matching: PairedEffect
    p_matching: PairedEffect | None
    per_seed: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_seeds": self.n_seeds,
            "matching": self.matching.to_dict(),
            "p_matching": None if self.p_matching is None else self.p_matching.to_dict(),
            "per_seed": self.per_seed,
        }


def ab_effect_vs_controls(
    controls: Sequence[ABResult],
    method: ABResult,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> ControlComparison:
    """The method's effect over its controls (`finesteer.fit.controls`, ≥ 1 seed; 3 by default there),
    paired by item id; the headline number is `matching.difference`, method − control."""
    if not controls:
        raise StatsError("no control results to compare against")
    pairs = [_paired_records(control, method) for control in controls]
    after = pairs[0][1]
    was = np.mean([[float(bool(r["is_matching"])) for r in before] for before, _ in pairs], axis=0)
    now = [float(bool(r["is_matching"])) for r in after]
    kwargs: dict[str, Any] = {
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "clusters": mirror_clusters(after),
    }
    matching = paired_effect(now, was, binary=False, **kwargs)
    per_seed = {
        "delta_matching_rate": seed_spread([method.matching_rate - c.matching_rate for c in controls])
    }
    p_after, p_befores = _p_matching(after), [_p_matching(before) for before, _ in pairs]
    p_effect = None
    if p_after is not None and all(p is not None for p in p_befores):
        p_effect = paired_effect(p_after, np.mean(p_befores, axis=0), binary=False, **kwargs)
        per_seed["delta_mean_p_matching"] = seed_spread([float((p_after - p).mean()) for p in p_befores])  # type: ignore[operator]
    return ControlComparison(len(after), len(controls), matching, p_effect, per_seed)
