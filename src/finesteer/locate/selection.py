"""Choose how many of the ranked heads to steer, and with which shared α, on a validation split.

Letter-balanced metrics. Small models answer A/B questions largely by letter preference, and adding
any vector at the answer position shifts that preference. On a handful of items whose matching
letters are not perfectly balanced, a pure shift toward "B" looks like a behaviour gain and does not
transfer to another split. So items are grouped by their matching letter and the metric is the mean
over groups (a macro average): a letter shift raises one group and lowers the other, only steering
that helps items of every letter raises it. The plain numbers are reported alongside.

Candidates are the prefixes of a ranking (top-1 … top-k heads) × the α grid, all scored in one pass
of the exact cached-prefix scorer. Ties go to fewer heads, then the smaller |α|: the weakest edit
that does the job disturbs the rest of the model least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from finesteer.activations.directions import HeadDirections
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, ABScorer, OptionScores
from finesteer.sites import Head


class SelectionError(FinesteerError, ValueError):
    """A head/α selection that cannot be made (k out of range, no validation items)."""


def letter_groups(letters: Sequence[str]) -> list[Tensor]:
    """Boolean masks of the items sharing each matching letter (in sorted letter order)."""
    return [torch.tensor([x == letter for x in letters]) for letter in sorted(set(letters))]


def balanced_mean(values: Tensor, letters: Sequence[str]) -> Tensor:
    """Mean over letter groups of the per-group mean along the last axis (items)."""
    if values.shape[-1] != len(letters):
        raise ValueError(f"{values.shape[-1]} item values but {len(letters)} matching letters")
    groups = [values[..., mask].float().mean(dim=-1) for mask in letter_groups(letters)]
    return torch.stack(groups).mean(dim=0)


def worst_letter_gain(per_item: Tensor, baseline: Tensor, letters: Sequence[str]) -> Tensor:
    """min over letter groups of (group mean of per_item − group mean of baseline), last axis = items."""
    gains = [per_item[..., mask].mean(dim=-1) - baseline[mask].mean() for mask in letter_groups(letters)]
    return torch.stack(gains).min(dim=0).values


@dataclass(frozen=True)
class Candidate:
    """One (number of heads, α) evaluated on the validation items."""

    k: int
    alpha: float
    balanced_rate: float
    balanced_p: float
    matching_rate: float
    mean_p_matching: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidate(k: int, alpha: float, scores: OptionScores, row: int, letters: Sequence[str]) -> Candidate:
    # float32 tables, as the selection has always been computed (keeps its numbers and ties).
    p_matching, matching = scores.p_matching.float(), scores.matching.float()
    return Candidate(
        k=k,
        alpha=alpha,
        balanced_rate=float(balanced_mean(matching[row], letters)),
        balanced_p=float(balanced_mean(p_matching[row], letters)),
        matching_rate=float(matching.mean(dim=-1)[row]),
        mean_p_matching=float(p_matching.mean(dim=-1)[row]),
    )


def best_candidate(candidates: Sequence[Candidate], sign: float = 1.0) -> Candidate:
    """Highest balanced rate (toward `sign`), then balanced p, then fewer heads, then smaller |α|."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    return min(candidates, key=lambda c: (-sign * c.balanced_rate, -sign * c.balanced_p, c.k, abs(c.alpha)))


@dataclass
class Selection:
    """The chosen heads and α, the unsteered validation numbers and every candidate's numbers."""

    heads: list[Head]
    alpha: float
    chosen: Candidate
    baseline: Candidate
    candidates: list[Candidate]

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [[layer, head] for layer, head in self.heads],
            "alpha": self.alpha,
            "chosen": self.chosen.to_dict(),
            "baseline": self.baseline.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def select_prefix_and_alpha(
    lm: LoadedModel,
    ranked_heads: Sequence[Head],
    directions: HeadDirections,
    val_items: Sequence[ABItem],
    alphas: Sequence[float],
    *,
    k: int,
    search_k: bool = True,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_rows: int = 128,
) -> Selection:
    """Score top-j heads (j = 1..k, or only k without `search_k`) × α on `val_items`; keep the best."""
    if k < 1:
        raise SelectionError(f"k must be ≥ 1, got {k}")
    if len(ranked_heads) < k:
        raise SelectionError(f"asked for k={k} heads but the ranking has only {len(ranked_heads)}")
    if not val_items:
        raise SelectionError("no validation items to choose the heads and α on")
    sign = 1.0 if alphas[0] > 0 else -1.0
    sizes = list(range(1, k + 1)) if search_k else [k]
    configs = [(j, float(a)) for j in sizes for a in alphas]
    interventions = [Intervention()] + [directions.intervention(ranked_heads[:j], a) for j, a in configs]
    scorer = ABScorer(lm, val_items, prompt, batch_size=batch_size, max_rows=max_rows)
    scores = scorer.score(interventions, reuse_prefix=1)
    letters = [item.matching_letter for item in val_items]
    baseline = _candidate(0, 0.0, scores, 0, letters)
    candidates = [_candidate(j, a, scores, row, letters) for row, (j, a) in enumerate(configs, start=1)]
    chosen = best_candidate(candidates, sign)
    return Selection(list(ranked_heads[: chosen.k]), chosen.alpha, chosen, baseline, candidates)
