"""The points of a refusal frontier: a steering swept over strength, random-direction controls of a
vector, the top-k heads of a ranking ablated with random heads of the same count, and the unmodified
model. Each is a `FrontierEntry` that `evaluate.frontier.run_frontier` measures."""

from __future__ import annotations

from collections.abc import Sequence

from finesteer.evaluate.compare import ComparisonError
from finesteer.evaluate.frontier import FrontierEntry
from finesteer.fit.controls import CONTROL_SEEDS, random_ablation_control, random_direction_control
from finesteer.fit.steering import Steering
from finesteer.locate.ships import DEFAULT_EPS, ablation
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head


def point_id(series: str, strength: float, seed: int | None = None) -> str:
    return f"{series}@{strength:g}" + (f"-seed{seed}" if seed is not None else "")


def baseline_entry(lm: LoadedModel) -> FrontierEntry:
    return FrontierEntry("baseline", 0.0, Steering("baseline", lm=lm), "baseline")


def swept_entries(
    steering: Steering, strengths: Sequence[float], series: str | None = None
) -> list[FrontierEntry]:
    """`steering.scaled(λ)` for each λ: one curve (a steering without intervention is one point)."""
    name = series or steering.name
    if steering.intervention is None:
        return [FrontierEntry(name, 1.0, steering.renamed(point_id(name, 1.0)))]
    return [FrontierEntry(name, float(s), steering.scaled(s, name=point_id(name, s))) for s in strengths]


def direction_control_entries(
    steering: Steering, strength: float, seeds: Sequence[int] = CONTROL_SEEDS, series: str | None = None
) -> list[FrontierEntry]:
    """Random directions of the same norms at `strength` (`fit.controls.random_direction_control`)."""
    name = f"random-direction:{series or steering.name}"
    if steering.intervention is None:
        raise ComparisonError(f"'{steering.name}' has no vector to replace by random directions")
    scaled = steering.intervention.scaled(strength)
    return [
        FrontierEntry(
            name,
            float(strength),
            Steering(
                point_id(name, strength, s),
                random_direction_control(scaled, s),
                {"control_of": steering.name},
                lm=steering.lm,
            ),
            "control",
            None,
            int(s),
        )
        for s in seeds
    ]


def head_ablation_entries(
    lm: LoadedModel,
    ranking: Sequence[Head],
    ks: Sequence[int],
    *,
    name: str = "heads",
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    seeds: Sequence[int] = CONTROL_SEEDS,
) -> list[FrontierEntry]:
    """Ablating the top-k heads of `ranking` (k = strength and size) and, per k, as many random heads
    (never ranked top-k ones) for each seed (`fit.controls.random_ablation_control`)."""
    heads = [(int(layer), int(head)) for layer, head in ranking]
    if not ks or any(k < 1 or k > len(heads) for k in ks):
        raise ComparisonError(f"head counts {list(ks)} must lie in 1..{len(heads)} (the ranking's length)")
    entries = []
    for k in sorted(set(int(k) for k in ks)):
        edit = ablation(heads[:k], mode, eps)
        meta = {"heads": [list(h) for h in heads[:k]], "mode": mode, "eps": eps}
        entries.append(
            FrontierEntry(
                f"top:{name}", k, Steering(point_id(f"top:{name}", k), edit, meta, lm=lm), "method", k
            )
        )
        for seed in seeds:
            control = random_ablation_control(
                edit, lm.info.n_layers, lm.info.n_heads, int(seed), exclude=heads[:k]
            )
            sid = point_id(f"random:{name}", k, int(seed))
            meta = {"heads": [list(h) for h in control.heads], "mode": mode, "control_of": f"top:{name}"}
            entries.append(
                FrontierEntry(
                    f"random:{name}",
                    k,
                    Steering(sid, control.intervention, meta, lm=lm),
                    "control",
                    k,
                    int(seed),
                )
            )
    return entries


__all__ = [
    "baseline_entry",
    "direction_control_entries",
    "head_ablation_entries",
    "point_id",
    "swept_entries",
]
