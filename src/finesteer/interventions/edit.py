"""Edits (site + op + positions + batch rows) and their composition into an `Intervention`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from finesteer.errors import FinesteerError
from finesteer.interventions.ops import Add, Op, ProjectOut, Scale, SetTo, Zero
from finesteer.interventions.scope import Scope
from finesteer.models.info import ModelInfo
from finesteer.sites import Site

AblationMethod = Literal["zero", "mean", "uniform_attention", "scale_output"]


class InterventionError(FinesteerError, ValueError):
    """An intervention that does not fit the model (vector size, rows) or is malformed."""


@dataclass(frozen=True)
class Edit:
    """Apply `op` at `site` on the positions of `scope`, in batch `rows` (None = every row)."""

    site: Site
    op: Op
    scope: Scope = field(default_factory=Scope)
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope", Scope.parse(self.scope))
        if self.rows is not None:
            rows = tuple(int(r) for r in self.rows)
            if any(r < 0 for r in rows):
                raise InterventionError(f"edit at {self.site}: batch rows must be ≥ 0, got {rows}")
            object.__setattr__(self, "rows", rows)

    def validate(self, info: ModelInfo) -> None:
        self.site.validate(info)
        if not self.site.editable:
            raise InterventionError(f"{self.site} is read-only: it can be captured but not edited")
        width = self.op.vector_width()
        expected = self.site.width(info)
        if width is not None and width != expected:
            what = "head_dim" if self.site.is_head and self.site.head is not None else "site width"
            raise InterventionError(
                f"vector for {self.site} has {width} elements; this site takes {what}={expected}"
            )


@dataclass(frozen=True)
class Intervention:
    """An ordered set of edits, applied together. Compose with `+`; make per-row batches with `per_row`."""

    edits: tuple[Edit, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))

    def __add__(self, other: Intervention) -> Intervention:
        return Intervention(self.edits + other.edits)

    def __len__(self) -> int:
        return len(self.edits)

    def validate(self, info: ModelInfo) -> None:
        for edit in self.edits:
            edit.validate(info)

    def is_identity(self) -> bool:
        return all(edit.op.is_identity() for edit in self.edits)

    def on_rows(self, rows: Iterable[int]) -> Intervention:
        """The same edits restricted to the given batch rows."""
        return Intervention(tuple(replace(e, rows=tuple(rows)) for e in self.edits))

    def scaled(self, factor: float) -> Intervention:
        """Multiply every additive edit's scale (α sweeps); other ops are unchanged."""
        edits = tuple(
            replace(e, op=Add(e.op.vector, e.op.scale * factor)) if isinstance(e.op, Add) else e
            for e in self.edits
        )
        return Intervention(edits)

    @property
    def sites(self) -> list[Site]:
        return sorted({e.site for e in self.edits})

    def digest(self) -> str:
        """A short hash of the exact content (sites, ops, params, scopes, rows, float32 tensor bytes).

        The one intervention hash: resumable runs store it to check they continue with the same
        intervention, and scans key candidates by it. Equal edits give equal digests across runs.
        """
        digest = hashlib.sha256()
        for edit in self.edits:
            spec = {
                "site": edit.site.name,
                "op": edit.op.kind,
                "params": edit.op.params(),
                "scope": str(edit.scope),
                "rows": list(edit.rows) if edit.rows is not None else None,
            }
            digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
            for key, tensor in sorted(edit.op.tensors().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def per_row(cls, interventions: Sequence[Intervention]) -> Intervention:
        """Row i of a batch gets interventions[i]: the basis of batched scans."""
        combined: tuple[Edit, ...] = ()
        for row, intervention in enumerate(interventions):
            combined += intervention.on_rows((row,)).edits
        return cls(combined)


def steer_head(
    layer: int, head: int, vector: Tensor, scale: float = 1.0, scope: str | Scope = "last"
) -> Intervention:
    """Add scale·vector to one head's output (o_proj input slice); HSI/ITI default to the last position."""
    return Intervention((Edit(Site(layer, "z", head), Add(vector, scale), Scope.parse(scope)),))


def steer_residual(
    layer: int, vector: Tensor, scale: float = 1.0, scope: str | Scope = "all", component: str = "resid_post"
) -> Intervention:
    """Add scale·vector to the residual stream after (or before) a block: CAA-style layer steering."""
    return Intervention((Edit(Site(layer, component), Add(vector, scale), Scope.parse(scope)),))  # type: ignore[arg-type]


def check_eps(eps: float) -> float:
    """The one check of an ablation's ε (Ships' query/output scale): a finite number ≥ 0, as a float."""
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise InterventionError(f"ε must be a finite number ≥ 0, got {eps}")
    return eps


def ablate_head(
    layer: int,
    head: int,
    method: AblationMethod = "zero",
    *,
    eps: float = 1e-5,
    mean: Tensor | None = None,
    scope: str | Scope = "all",
) -> Intervention:
    """Ablate one head.

    zero / mean: replace its output; scale_output: multiply its output by ε (Ships "scaling
    contribution"); uniform_attention: multiply its query by ε so its attention becomes uniform over
    the causal prefix (Ships "undifferentiated attention").
    """
    op: Op
    if method == "zero":
        site, op = Site(layer, "z", head), Zero()
    elif method == "mean":
        if mean is None:
            raise InterventionError("mean ablation needs `mean`: the head's mean output (head_dim values)")
        site, op = Site(layer, "z", head), SetTo(mean)
    elif method == "scale_output":
        site, op = Site(layer, "z", head), Scale(eps)
    elif method == "uniform_attention":
        site, op = Site(layer, "q", head), Scale(eps)
    else:
        raise InterventionError(
            f"unknown ablation '{method}'; choose zero, mean, uniform_attention or scale_output"
        )
    return Intervention((Edit(site, op, Scope.parse(scope)),))


def ablate_heads(
    heads: Iterable[tuple[int, int]], method: AblationMethod = "zero", *, eps: float = 1e-5
) -> Intervention:
    """Ablate a group of heads together (Sahara groups, top-k ablations)."""
    total = Intervention()
    for layer, head in heads:
        total = total + ablate_head(layer, head, method, eps=eps)
    return total


def project_out(
    direction: Tensor, layers: Iterable[int], component: str = "resid_post", strength: float = 1.0
) -> Intervention:
    """Remove a direction from the residual stream at each given layer (directional ablation)."""
    return Intervention(
        tuple(Edit(Site(layer, component), ProjectOut(direction, strength)) for layer in layers)  # type: ignore[arg-type]
    )
