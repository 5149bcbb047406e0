"""Rank statistics of head tables: Spearman correlation, top-k overlap (`locate overlap`, attribution)."""

from __future__ import annotations

import torch
from torch import Tensor

from finesteer.errors import FinesteerError


class RankStatsError(FinesteerError, ValueError):
    """Rank statistics of tables that cannot be compared (different sizes, too short, bad k)."""


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (average ranks for ties)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() != b.numel() or a.numel() < 2:
        raise RankStatsError(f"spearman needs two vectors of one length ≥ 2, got {a.numel()}, {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def top_k_overlap(a: Tensor, b: Tensor, k: int = 10) -> int:
    """How many of a's k highest entries are among b's k highest (flattened tables)."""
    a, b = a.flatten(), b.flatten()
    if a.numel() != b.numel() or not 1 <= k <= a.numel():
        raise RankStatsError(f"top_k_overlap needs equal sizes and 1 ≤ k ≤ size, got k={k}")
    first = set(_top(a, k))
    return len(first & set(_top(b, k)))


def _top(x: Tensor, k: int) -> list[int]:
    values = x.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def rank_agreement(estimate: Tensor, exact: Tensor, k: int = 10) -> dict[str, float]:
    """Spearman and top-k overlap of two head tables (e.g. estimate vs the exact scan of all heads)."""
    return {"spearman": spearman(estimate, exact), f"top{k}_overlap": top_k_overlap(estimate, exact, k)}
