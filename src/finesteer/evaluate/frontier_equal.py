"""Compare methods at equal cost, not at one λ: interpolate each curve of a frontier table at common
cost levels (over-refusal by default, or KL).

A method's curve is the unmodified model (λ = 0) followed by its points in order of strength. At a
level L the curve's first segment whose end points bracket L (x_i ≤ L ≤ x_{i+1} or the reverse) gives
y by linear interpolation, and the interval by interpolating the two end points' interval bounds
with the same weight (an approximation: the interval of a point that was not measured; the cost's
own uncertainty is not propagated). A curve that never reaches L has no value there, with a reason.
Methods are then ranked at each level; "separated" says the best one's interval lies above every
other method's, i.e. it is more selective beyond the noise of these n.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

from finesteer.evaluate.errors import EvaluationError

COSTS: tuple[str, ...] = ("over_refusal", "kl")


def _xy(row: Mapping[str, Any], cost: str) -> tuple[float, float, float, float] | None:
    x, y = row[cost]["value"], row["y"]
    if x is None or y["value"] is None:
        return None
    low = y["low"] if y["low"] is not None else y["value"]
    high = y["high"] if y["high"] is not None else y["value"]
    return float(x), float(y["value"]), float(low), float(high)


def curves(table: Mapping[str, Any], cost: str = "over_refusal") -> dict[str, list[tuple[float, ...]]]:
    """Per method series: [(strength, x, y, y_low, y_high)], the baseline first (strength 0)."""
    if cost not in COSTS:
        raise EvaluationError(f"unknown cost {cost!r}; choose {', '.join(COSTS)}")
    rows = table["points"]
    base = [r for r in rows if r["kind"] == "baseline"]
    start = [(0.0, *xy) for r in base[:1] if (xy := _xy(r, cost)) is not None]
    series: dict[str, list[tuple[float, ...]]] = {}
    for row in rows:
        if row["kind"] != "method":
            continue
        xy = _xy(row, cost)
        if xy is not None:
            series.setdefault(row["series"], []).append((float(row["strength"]), *xy))
    return {name: start + sorted(points) for name, points in series.items()}


def interpolate(curve: Sequence[tuple[float, ...]], level: float) -> dict[str, Any]:
    """y (and its interval, and the strength) where the curve first reaches cost `level`."""
    for a, b in pairwise(curve):
        (sa, xa, ya, la, ha), (sb, xb, yb, lb, hb) = a, b
        if min(xa, xb) <= level <= max(xa, xb):
            t = 1.0 if xb == xa else (level - xa) / (xb - xa)
            return {
                "value": ya + t * (yb - ya),
                "low": la + t * (lb - la),
                "high": ha + t * (hb - ha),
                "strength": sa + t * (sb - sa),
            }
    if len(curve) == 1 and curve[0][1] == level:
        s, _, y, low, high = curve[0]
        return {"value": y, "low": low, "high": high, "strength": s}
    return {
        "value": None,
        "low": None,
        "high": None,
        "strength": None,
        "reason": "the curve does not reach this cost",
    }


def common_levels(all_curves: Mapping[str, Sequence[tuple[float, ...]]], n: int = 5) -> list[float]:
    """`n` evenly spaced cost levels inside the range every swept curve covers (two or more strengths
    after the baseline), plus the cost of each single-point method (e.g. a system prompt), so that
    it is compared with the curves where it stands."""
    swept = [c for c in all_curves.values() if len(c) > 2]
    singles = sorted({round(c[-1][1], 6) for c in all_curves.values() if len(c) == 2}) if swept else []
    swept = swept or [c for c in all_curves.values() if len(c) > 1]
    spans = [(min(p[1] for p in c), max(p[1] for p in c)) for c in swept]
    if not spans:
        return singles
    low, high = max(s[0] for s in spans), min(s[1] for s in spans)
    if high <= low:
        return singles
    grid = [round(low + (high - low) * (i + 1) / (n + 1), 6) for i in range(n)]
    return sorted(set(grid) | {x for x in singles if low <= x <= high})


def at_equal_cost(
    table: Mapping[str, Any],
    *,
    cost: str = "over_refusal",
    levels: Sequence[float] | None = None,
    series: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Each method's y (with interval) at common cost levels, and per level which method is best and
    whether it is separated from the rest (its low above every other's high)."""
    found = curves(table, cost)
    if series is not None:
        missing = sorted(set(series) - set(found))
        if missing:
            raise EvaluationError(f"no method points for series {', '.join(missing)}")
        found = {name: found[name] for name in series}
    chosen = list(levels) if levels is not None else common_levels(found)
    by_level = []
    for level in chosen:
        values = {name: interpolate(curve, level) for name, curve in found.items()}
        reached = {k: v for k, v in values.items() if v["value"] is not None}
        entry: dict[str, Any] = {"level": level, "methods": values}
        if reached:
            best = max(reached, key=lambda k: reached[k]["value"])
            others = [v["high"] for k, v in reached.items() if k != best]
            entry["best"] = best
            entry["separated"] = bool(others) and all(reached[best]["low"] > h for h in others)
        by_level.append(entry)
    return {"cost": cost, "levels": chosen, "series": list(found), "by_level": by_level}


__all__ = ["COSTS", "at_equal_cost", "common_levels", "curves", "interpolate"]
