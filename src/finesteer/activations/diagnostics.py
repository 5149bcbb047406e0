"""Is a contrastive direction worth steering along? Diagnostics, and answer-format components removed.

Braun et al. (2025, "Understanding (un)reliability of steering vectors") found that two numbers read
off the training activations predict whether steering along a mean-difference direction works:

* **consistency**: the mean cosine similarity between each item's activation difference
  (matching answer − other answer) and the mean difference (of the other items, so that noise
  scores ≈ 0). Near 1, every item moves the same way;
  near 0, the mean is an average of unrelated differences and steering along it is unreliable.
* **separation** of the two classes along the direction: d′ (difference of the class means of the
  projections over their pooled std) and AUROC (probability that a matching row projects higher
  than a not-matching one), each half of the items projected on the other half's direction.

`direction_diagnostics` computes both for every site (head or layer) at once.

A/B contrast sets confound the behaviour with the answer's format: in the CAA behaviour files the
matching option is mostly "(A)" in one file and mostly "Yes" in most. `format_axes` estimates, per
site, the answer-letter axis and the Yes/No axis *within* each class (so the behaviour itself does
not leak into them), and `project_out` removes them from a direction: the result has no component
along either, whatever the letter and polarity mix of the training items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from finesteer.errors import FinesteerError

LOW_CONSISTENCY = 0.1
"""Mean cosine below this: per-item differences point in scattered directions (warned about)."""
LOW_AUROC = 0.65
"""AUROC below this: the two classes overlap along the direction (warned about)."""
DIAGNOSTIC_KEYS = ("consistency", "d_prime", "auroc")


class DiagnosticsError(FinesteerError, ValueError):
    """Activations that cannot be diagnosed (shapes disagree, a class missing)."""


@dataclass(frozen=True)
class DirectionDiagnostics:
    """Per-site consistency, d′ and AUROC (each of the sites' shape, e.g. [n_layers, n_heads])."""

    consistency: Tensor
    d_prime: Tensor
    auroc: Tensor
    paired: bool

    def at(self, *site: int) -> dict[str, float]:
        """The three numbers of one site (e.g. `at(layer, head)`), JSON-ready."""
        return {key: round(float(getattr(self, key)[site]), 4) for key in DIAGNOSTIC_KEYS}

    def is_low(self, *site: int) -> bool:
        numbers = self.at(*site)
        return numbers["consistency"] < LOW_CONSISTENCY or numbers["auroc"] < LOW_AUROC

    def warnings(
        self, sites: Sequence[Sequence[int]], what: str = "head", names: Sequence[str] | None = None
    ) -> list[str]:
        """One line for each of `sites` whose consistency or separation is low (named by `names`,
        default the site's indices joined by dots)."""
        lines = []
        for i, site in enumerate(sites):
            if self.is_low(*site):
                n = self.at(*site)
                name = names[i] if names is not None else ".".join(str(int(x)) for x in site)
                lines.append(
                    f"{what} {name}: direction diagnostics are low (consistency {n['consistency']:.2f} < "
                    f"{LOW_CONSISTENCY} or AUROC {n['auroc']:.2f} < {LOW_AUROC}); steering along it "
                    "may be unreliable (Braun et al. 2025)"
                )
        return lines

    def tensors(self) -> dict[str, Tensor]:
        return {f"diag_{key}": getattr(self, key).float().contiguous() for key in DIAGNOSTIC_KEYS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], paired: bool = True) -> DirectionDiagnostics | None:
        if not all(f"diag_{key}" in tensors for key in DIAGNOSTIC_KEYS):
            return None
        return cls(*(tensors[f"diag_{key}"] for key in DIAGNOSTIC_KEYS), paired=paired)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key).tolist() for key in DIAGNOSTIC_KEYS} | {"paired": self.paired}


def _split(z: Tensor, labels: Tensor | Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.as_tensor(labels, dtype=torch.bool)
    if y.dim() != 1 or y.shape[0] != z.shape[0]:
        raise DiagnosticsError(f"{z.shape[0]} activation rows but labels of shape {tuple(y.shape)}")
    if bool(y.all()) or not bool(y.any()):
        raise DiagnosticsError("diagnostics need rows of both classes")
    return z.double(), z.double()[y], z.double()[~y]


def _auroc(pos: Tensor, neg: Tensor) -> Tensor:
    """P(pos > neg) + ½ P(pos = neg) over all pairs, per site (pos [P, …], neg [Q, …])."""
    wins = torch.zeros(pos.shape[1:], dtype=torch.float64)
    for row in pos:  # P × (Q × sites) comparisons, one positive row at a time keeps memory small
        wins += (row > neg).double().sum(0) + 0.5 * (row == neg).double().sum(0)
    return wins / (pos.shape[0] * neg.shape[0])


def _mean_difference(pos: Tensor, neg: Tensor, remove: Tensor | None) -> Tensor:
    diff = pos.mean(0) - neg.mean(0)
    return diff if remove is None or remove.shape[0] == 0 else project_out(diff, remove)


def direction_diagnostics(
    z: Tensor, labels: Tensor | Sequence[bool], remove: Tensor | None = None
) -> DirectionDiagnostics:
    """Consistency and separation of the classes along each site's direction, out of sample.

    `z` is [N, *sites, D] (e.g. [N, n_layers, n_heads, head_dim] or [N, n_layers, hidden]); `labels`
    marks behaviour-matching rows. When rows come in pairs (matching, other) — as
    `ab_contrast_inputs` makes them — the per-item difference is the pair's; otherwise each
    matching row minus the mean other row.

    Both are computed so that pure noise scores ≈ 0 consistency and ≈ 0.5 AUROC whatever n and D
    (in-sample numbers are inflated by each item's own share of the mean): consistency is each
    item's cosine with the mean difference of the *other* items; d′ and AUROC project each half of
    the items (even / odd) on the direction fitted on the other half (2-fold cross-fitting).
    `remove` (e.g. `format_axes`) is projected out of every fitted direction, as for the directions.
    """
    z, pos, neg = _split(z, labels)
    y = torch.as_tensor(labels, dtype=torch.bool)
    paired = z.shape[0] % 2 == 0 and bool(y[0::2].all()) and not bool(y[1::2].any())
    diffs = z[0::2] - z[1::2] if paired else pos - neg.mean(0)
    n = diffs.shape[0]
    if n < 2 or neg.shape[0] < 2:
        raise DiagnosticsError("diagnostics need at least 2 items of each class")
    others = (diffs.sum(0, keepdim=True) - diffs) / (n - 1)
    if remove is not None and remove.shape[0] > 0:
        others = torch.stack([project_out(o, remove) for o in others])
    cos = torch.nn.functional.cosine_similarity(diffs, others, dim=-1)
    folds = [(pos[0::2], neg[0::2], pos[1::2], neg[1::2]), (pos[1::2], neg[1::2], pos[0::2], neg[0::2])]
    p_pos, p_neg = [], []
    for fit_pos, fit_neg, test_pos, test_neg in folds:
        axis = _mean_difference(fit_pos, fit_neg, remove)
        unit = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        p_pos.append((test_pos * unit).sum(-1))
        p_neg.append((test_neg * unit).sum(-1))
    a, b = torch.cat(p_pos), torch.cat(p_neg)
    pooled = ((a.var(0, correction=0) + b.var(0, correction=0)) / 2).sqrt()
    gap = a.mean(0) - b.mean(0)
    d_prime = torch.where(pooled > 0, gap / pooled.clamp_min(1e-30), torch.zeros_like(gap))
    return DirectionDiagnostics(cos.mean(0).float(), d_prime.float(), _auroc(a, b).float(), paired)


def _within_class_axis(z: Tensor, y: Tensor, first: Tensor, second: Tensor) -> Tensor | None:
    """Mean over classes of (mean z | first − mean z | second) within that class; None when no class
    has rows of both kinds (then the factor cannot be told apart from the behaviour)."""
    parts = []
    for cls in (y, ~y):
        a, b = cls & first, cls & second
        if bool(a.any()) and bool(b.any()):
            parts.append(z[a].mean(0) - z[b].mean(0))
    return torch.stack(parts).mean(0) if parts else None


def format_axes(
    z: Tensor, labels: Tensor | Sequence[bool], letters: Sequence[str], polarities: Sequence[str]
) -> Tensor:
    """Per-site answer-format axes [K, *sites, D] (K ≤ 2): the letter axis (rows answering the first
    letter − rows answering the others) and the Yes/No axis (rows answering "Yes…" − "No…"), each
    estimated within the matching and within the not-matching rows and averaged."""
    z = z.double()
    y = torch.as_tensor(labels, dtype=torch.bool)
    if not (len(letters) == len(polarities) == z.shape[0] == y.shape[0]):
        raise DiagnosticsError(
            f"{z.shape[0]} rows, {y.shape[0]} labels, {len(letters)} letters, {len(polarities)} polarities"
        )
    axes = []
    first = sorted(set(letters))[0] if letters else ""
    letter_a = torch.tensor([x == first for x in letters])
    axis = _within_class_axis(z, y, letter_a, ~letter_a)
    if axis is not None:
        axes.append(axis)
    yes = torch.tensor([p == "yes" for p in polarities])
    no = torch.tensor([p == "no" for p in polarities])
    axis = _within_class_axis(z, y, yes, no)
    if axis is not None:
        axes.append(axis)
    if not axes:
        return torch.zeros((0, *z.shape[1:]), dtype=torch.float64)
    return torch.stack(axes)


def project_out(vectors: Tensor, axes: Tensor) -> Tensor:
    """`vectors` [*sites, D] minus their components in the span of `axes` [K, *sites, D], per site
    (Gram-Schmidt in float64; zero axes are skipped). Norms are not restored."""
    out = vectors.double().clone()
    basis: list[Tensor] = []
    for axis in axes.double():
        u = axis.clone()
        for b in basis:
            u = u - (u * b).sum(-1, keepdim=True) * b
        norm = u.norm(dim=-1, keepdim=True)
        u = torch.where(norm > 1e-12, u / norm.clamp_min(1e-30), torch.zeros_like(u))
        basis.append(u)
        out = out - (out * u).sum(-1, keepdim=True) * u
    return out.to(vectors.dtype)


__all__ = [
    "DIAGNOSTIC_KEYS",
    "LOW_AUROC",
    "LOW_CONSISTENCY",
    "DiagnosticsError",
    "DirectionDiagnostics",
    "direction_diagnostics",
    "format_axes",
    "project_out",
]
