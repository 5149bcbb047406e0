"""Matched controls: an edit that spends the same budget as a method's, without the method's choice.

A steering or ablation effect means little until it is set beside what an arbitrary edit of the same
size does. Each builder here takes what a method produced and returns its control:

* `random_head_control` (HSI, ITI): as many random heads as the method steered, each pushed by the
  same α in units of *its own* σ along its own fitted direction (`HeadDirections.intervention`), so
  only the choice of heads differs; `random_direction=True` also replaces each direction by a random
  unit one, keeping α·σ.
* `random_direction_control` (CAA, STA, SAE-all, directional ablation): every added vector replaced
  by a random direction of equal norm at the same site, scope and rows, with the same scale (a
  projected-out direction by a random unit one).
* `random_ablation_control` (Ships, Sahara, `ablate`): the same ablation applied to as many random
  heads, at the same component (output or query).

Random heads never include the method's own heads (nor `exclude`). A control is a pure function of
its inputs and `seed` (a `torch.Generator` seeded with it; nothing process-wide), and
`matched_controls` builds one per seed, at least `CONTROL_SEEDS` = 3 of them by default;
`controls_for` picks the matching kind for any fitted intervention (what `compare`, the refusal
experiment and `ablate` call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from finesteer.activations.directions import HeadDirections
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Intervention
from finesteer.interventions.ops import Add, ProjectOut, SetTo
from finesteer.interventions.scope import Scope
from finesteer.sites import Head, Site

__all__ = [
    "CONTROL_SEEDS",
    "Control",
    "ControlError",
    "control_kind",
    "controls_for",
    "matched_controls",
    "matched_direction_controls",
    "random_ablation_control",
    "random_direction_control",
    "random_head_control",
    "random_heads",
]

CONTROL_SEEDS: tuple[int, ...] = (0, 1, 2)


class ControlError(FinesteerError, ValueError):
    """A control that cannot be matched to the method's edit (too few heads left, unsupported op)."""


@dataclass(frozen=True)
class Control:
    """One control edit: `kind` ("random-heads", "random-direction", "random-ablation"), its seed,
    the edit, and the heads it touches (empty for a residual-stream control)."""

    kind: str
    seed: int
    intervention: Intervention
    heads: tuple[Head, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}-seed{self.seed}"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_heads(
    n_layers: int,
    n_heads: int,
    k: int,
    seed: int,
    exclude: Iterable[Head] = (),
    *,
    allowed: Iterable[Head] | None = None,
) -> list[Head]:
    """k heads drawn uniformly without replacement from every head (or only the `allowed` ones) not
    in `exclude`.

    A seed gives one permutation of the pool (layer-major order), so the draw for k is nested in the
    draw for k + 1 (the `ablate` experiment's random heads for k = 1..K).
    """
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    if allowed is None:
        allowed = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    pool = [(int(layer), int(head)) for layer, head in allowed]
    pool = [h for h in pool if h not in excluded]
    if k < 0 or k > len(pool):
        raise ControlError(f"cannot draw {k} random heads from the {len(pool)} heads outside the method's")
    order = torch.randperm(len(pool), generator=_generator(seed)).tolist()
    return [pool[i] for i in order[:k]]


def _random_unit(width: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    vector = torch.randn(width, generator=generator, dtype=torch.float64)
    return (vector / vector.norm()).to(dtype)


def random_direction_control(intervention: Intervention, seed: int) -> Intervention:
    """Every `Add` vector replaced by a random direction of the same norm (same scale, site, scope and
    rows); every `ProjectOut` direction by a random unit one. Other ops raise `ControlError`."""
    if not intervention.edits:
        raise ControlError("the method's intervention has no edits to match")
    generator = _generator(seed)
    edits = []
    for edit in intervention.edits:
        op = edit.op
        if isinstance(op, Add):
            unit = _random_unit(op.vector.numel(), generator, op.vector.dtype)
            edits.append(
                replace(edit, op=Add(unit * op.vector.double().norm().to(op.vector.dtype), op.scale))
            )
        elif isinstance(op, ProjectOut):
            unit = _random_unit(op.direction.numel(), generator, op.direction.dtype)
            edits.append(replace(edit, op=ProjectOut(unit, op.strength)))
        else:
            raise ControlError(
                f"a random-direction control needs added or projected-out vectors; edit at {edit.site} is "
                f"'{op.kind}' (use random_ablation_control for ablations)"
            )
    return Intervention(tuple(edits))


def random_head_control(
    directions: HeadDirections,
    heads: Sequence[Head],
    alpha: float | Mapping[Head, float],
    seed: int,
    *,
    scope: str | Scope = "last",
    exclude: Iterable[Head] = (),
    random_direction: bool = False,
) -> Control:
    """As many random heads as `heads`, each steered by α·σ·v̂ with its own σ and fitted v̂.

    With a per-head α (a mapping), the i-th random head gets the α of the i-th method head. Heads
    without a direction (σ = 0) are never drawn.
    """
    method_heads = [(int(layer), int(head)) for layer, head in heads]
    if not method_heads:
        raise ControlError("no heads to match")
    steerable = [
        (layer, head)
        for layer in range(directions.n_layers)
        for head in range(directions.n_heads)
        if float(directions.directions[layer, head].norm()) > 0 and float(directions.sigma[layer, head]) > 0
    ]
    excluded = [*method_heads, *exclude]
    drawn = random_heads(
        directions.n_layers, directions.n_heads, len(method_heads), seed, excluded, allowed=steerable
    )
    if isinstance(alpha, Mapping):
        alphas: float | dict[Head, float] = {
            new: float(alpha[old]) for old, new in zip(method_heads, drawn, strict=True)
        }
    else:
        alphas = float(alpha)
    intervention = directions.intervention(drawn, alphas, scope)
    if random_direction:
        intervention = random_direction_control(intervention, seed)
    return Control("random-heads", int(seed), intervention, tuple(drawn))


def random_ablation_control(
    intervention: Intervention, n_layers: int, n_heads: int, seed: int, *, exclude: Iterable[Head] = ()
) -> Control:
    """The same ablation ops moved to as many random heads (same components, scopes and rows).

    Every edit must sit on one head; a mean ablation (`SetTo`) is refused because its value belongs
    to the head it was measured on.
    """
    method_heads: list[Head] = []
    for edit in intervention.edits:
        if edit.site.head is None:
            raise ControlError(f"a random-head ablation control needs per-head edits; {edit.site} is not one")
        if isinstance(edit.op, SetTo):
            raise ControlError(
                f"edit at {edit.site} sets a head-specific value; it cannot move to another head"
            )
        if (edit.site.layer, edit.site.head) not in method_heads:
            method_heads.append((edit.site.layer, edit.site.head))
    if not method_heads:
        raise ControlError("the method's intervention has no edits to match")
    drawn = random_heads(n_layers, n_heads, len(method_heads), seed, [*method_heads, *exclude])
    moved = dict(zip(method_heads, drawn, strict=True))
    edits = []
    for edit in intervention.edits:
        layer, head = moved[(edit.site.layer, int(edit.site.head))]  # type: ignore[arg-type]
        edits.append(replace(edit, site=Site(layer, edit.site.component, head)))
    return Control("random-ablation", int(seed), Intervention(tuple(edits)), tuple(drawn))


def _direction_control(intervention: Intervention, seed: int) -> Control:
    return Control("random-direction", int(seed), random_direction_control(intervention, seed))


def matched_controls(build: Callable[[int], Control], seeds: Sequence[int] = CONTROL_SEEDS) -> list[Control]:
    """One control per seed: `build(seed)`, e.g. `lambda s: random_head_control(dirs, heads, 2.0, s)`.

    Residual-stream vectors have `matched_direction_controls`. Seeds must be distinct.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ControlError(f"controls need at least one seed, all distinct; got {seeds}")
    return [build(seed) for seed in seeds]


def matched_direction_controls(
    intervention: Intervention, seeds: Sequence[int] = CONTROL_SEEDS
) -> list[Control]:
    """`random_direction_control` of `intervention` for each seed (CAA, STA, SAE-all)."""
    return matched_controls(lambda seed: _direction_control(intervention, seed), seeds)


def control_kind(intervention: Intervention | None) -> str | None:
    """Which matched control an intervention gets: "random-heads" (per-head added vectors: HSI, ITI),
    "random-ablation" (per-head ablations: Ships, Sahara, `ablate`), "random-direction" (residual
    added or projected-out vectors: CAA, STA, SAE-all), or None (nothing to match, or a mixture)."""
    if intervention is None or not intervention.edits:
        return None
    per_head = [edit.site.head is not None for edit in intervention.edits]
    adds = [isinstance(edit.op, Add) for edit in intervention.edits]
    if all(per_head) and all(adds):
        return "random-heads"
    if all(per_head) and not any(adds) and not any(isinstance(e.op, SetTo) for e in intervention.edits):
        return "random-ablation"
    if not any(per_head) and all(isinstance(edit.op, Add | ProjectOut) for edit in intervention.edits):
        return "random-direction"
    return None


def controls_for(
    intervention: Intervention | None,
    n_layers: int,
    n_heads: int,
    seeds: Sequence[int] = CONTROL_SEEDS,
    *,
    directions: HeadDirections | None = None,
) -> list[Control]:
    """The matched controls of a fitted intervention, one per seed (see `control_kind`).

    Per-head added vectors need `directions` (every head's fitted direction and σ, from the same
    data): each method head's α is read back as its scale × ‖vector‖ / σ in those units, and the random heads
    get the same α along their own direction. Raises `ControlError` when no control matches.
    """
    kind = control_kind(intervention)
    if kind is None or intervention is None:
        raise ControlError("no matched control for this edit (no intervention, or mixed kinds of edits)")
    if kind == "random-direction":
        return matched_direction_controls(intervention, seeds)
    if kind == "random-ablation":
        return matched_controls(
            lambda seed: random_ablation_control(intervention, n_layers, n_heads, seed), seeds
        )
    if directions is None:
        raise ControlError("a random-head control needs every head's direction and σ")
    alphas: dict[Head, float] = {}
    scopes = {edit.scope for edit in intervention.edits}
    for edit in intervention.edits:
        head = (edit.site.layer, int(edit.site.head))  # type: ignore[arg-type]
        sigma = float(directions.sigma[head])
        if sigma <= 0 or head in alphas:
            raise ControlError(f"head {head[0]}.{head[1]} has no σ, or is edited twice; cannot match its α")
        op = edit.op
        alphas[head] = float(op.scale) * float(op.vector.double().norm()) / sigma  # type: ignore[attr-defined]
    if len(scopes) != 1:
        raise ControlError("a random-head control needs one scope for every edit")
    scope = next(iter(scopes))
    return matched_controls(
        lambda seed: random_head_control(directions, list(alphas), alphas, seed, scope=scope), seeds
    )
