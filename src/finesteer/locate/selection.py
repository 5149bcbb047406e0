"""Choose how many of the ranked heads to steer, and with which shared α, on a validation split.

Letter-balanced metrics. Small models answer A/B questions largely by letter preference, and adding
any vector at the answer position shifts that preference. On a handful of items whose matching
letters are not perfectly balanced, a pure shift toward "B" looks like a behaviour gain and does not
transfer to another split. So items are grouped by their matching letter and the metric is the mean
over groups (a macro average): a letter shift raises one group and lowers the other, only steering
that helps items of every letter raises it. The plain numbers are reported alongside.

Candidates are the prefixes of a ranking (top-1 … top-k heads) × the α grid, all scored in one pass
of the exact cached-prefix scorer. Ties go to fewer heads, then the smaller |α|: the weakest edit
that does the job disturbs the rest of the model least. With `criterion="polarity"` the items are
grouped by matching letter × matching polarity (Yes / not Yes) and a candidate is judged by its
*worst* group's gain in p(matching): an edit that only adds a "Yes" cannot win.

Every candidate's per-item scores are kept (`SelectionEvidence`), with those of a matched control
per candidate when a control builder is given (e.g. random heads at the same α), so that
`finesteer.methods.verdict` can test the choice against the control, accounting for the number of
candidates tried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from finesteer.activations.directions import HeadDirections
from finesteer.data.balance import matching_polarity
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


Criterion = Literal["letter", "polarity"]
CRITERIA: tuple[str, ...] = ("letter", "polarity")
ControlBuilder = Callable[[Sequence[Head], float, int], Intervention]
"""(heads, α, seed) → the matched control edit of steering those heads by α (`finesteer.fit.controls`)."""


def polarity_groups(items: Sequence[ABItem]) -> list[str]:
    """Each item's matching letter × whether its matching answer is "Yes" (the `polarity` criterion)."""
    return [
        f"{item.matching_letter}|{'yes' if matching_polarity(item) == 'yes' else 'no/other'}"
        for item in items
    ]


@dataclass(frozen=True)
class Candidate:
    """One (number of heads, α) evaluated on the validation items. `worst_group_gain`: the smallest
    gain in mean p(matching) over the unsteered model among letter × polarity groups (toward the α sign)."""

    k: int
    alpha: float
    balanced_rate: float
    balanced_p: float
    matching_rate: float
    mean_p_matching: float
    worst_group_gain: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidate(
    k: int, alpha: float, scores: OptionScores, row: int, letters: Sequence[str], groups: Sequence[str]
) -> Candidate:
    # float32 tables, as the selection has always been computed (keeps its numbers and ties).
    p_matching, matching = scores.p_matching.float(), scores.matching.float()
    sign = 1.0 if alpha >= 0 else -1.0
    worst = worst_letter_gain(sign * p_matching[row], sign * p_matching[0], groups)
    return Candidate(
        k=k,
        alpha=alpha,
        balanced_rate=float(balanced_mean(matching[row], letters)),
        balanced_p=float(balanced_mean(p_matching[row], letters)),
        matching_rate=float(matching.mean(dim=-1)[row]),
        mean_p_matching=float(p_matching.mean(dim=-1)[row]),
        worst_group_gain=float(worst),
    )


def best_candidate(
    candidates: Sequence[Candidate], sign: float = 1.0, criterion: Criterion = "letter"
) -> Candidate:
    """Highest balanced rate (toward `sign`), then balanced p, then fewer heads, then smaller |α|;
    with `criterion="polarity"` the worst letter × polarity group's gain decides first."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if criterion == "polarity":
        return min(
            candidates,
            key=lambda c: (
                -c.worst_group_gain,
                -sign * c.balanced_rate,
                -sign * c.balanced_p,
                c.k,
                abs(c.alpha),
            ),
        )
    return min(candidates, key=lambda c: (-sign * c.balanced_rate, -sign * c.balanced_p, c.k, abs(c.alpha)))


@dataclass
class SelectionEvidence:
    """Per-item validation scores of every candidate, the unsteered model and (when given) the matched
    control of every candidate (mean over `control_seeds`): what a selection-aware test needs.
    Tables are [n_candidates, n_items] (float64 p(matching); 0/1 matching)."""

    labels: list[str]
    p_matching: Tensor
    matching: Tensor
    baseline_p: Tensor
    baseline_matching: Tensor
    item_ids: list[str]
    polarities: list[str]
    chosen_index: int
    direction: int
    control_p: Tensor | None = None
    control_matching: Tensor | None = None
    control_seeds: tuple[int, ...] = ()
    control_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """The chosen heads and α, the unsteered validation numbers and every candidate's numbers."""

    heads: list[Head]
    alpha: float
    chosen: Candidate
    baseline: Candidate
    candidates: list[Candidate]
    evidence: SelectionEvidence | None = None
    criterion: str = "letter"

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [[layer, head] for layer, head in self.heads],
            "alpha": self.alpha,
            "chosen": self.chosen.to_dict(),
            "baseline": self.baseline.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "criterion": self.criterion,
        }


def _control_rows(
    scorer: ABScorer,
    ranked_heads: Sequence[Head],
    configs: Sequence[tuple[int, float]],
    control: ControlBuilder,
    seeds: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Per-candidate control scores [n_candidates, n_items], the mean over seeds (scored in their own
    pass, so the candidates' numbers do not depend on whether controls were asked for)."""
    interventions = [control(ranked_heads[:j], a, seed) for j, a in configs for seed in seeds]
    scores = scorer.score(interventions, reuse_prefix=1)
    shape = (len(configs), len(seeds), -1)
    p = scores.p_matching.double().view(shape).mean(dim=1)
    return p, scores.matching.double().view(shape).mean(dim=1)


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
    criterion: Criterion = "letter",
    control: ControlBuilder | None = None,
    control_seeds: Sequence[int] = (0, 1, 2),
    control_kind: str | None = "random-heads",
) -> Selection:
    """Score top-j heads (j = 1..k, or only k without `search_k`) × α on `val_items`; keep the best.

    `control` (with `control_seeds`) also scores every candidate's matched control, kept in the
    selection's `evidence` beside every candidate's per-item scores."""
    if k < 1:
        raise SelectionError(f"k must be ≥ 1, got {k}")
    if len(ranked_heads) < k:
        raise SelectionError(f"asked for k={k} heads but the ranking has only {len(ranked_heads)}")
    if not val_items:
        raise SelectionError("no validation items to choose the heads and α on")
    if criterion not in CRITERIA:
        raise SelectionError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    sign = 1.0 if alphas[0] > 0 else -1.0
    sizes = list(range(1, k + 1)) if search_k else [k]
    configs = [(j, float(a)) for j in sizes for a in alphas]
    interventions = [Intervention()] + [directions.intervention(ranked_heads[:j], a) for j, a in configs]
    scorer = ABScorer(lm, val_items, prompt, batch_size=batch_size, max_rows=max_rows)
    scores = scorer.score(interventions, reuse_prefix=1)
    letters = [item.matching_letter for item in val_items]
    groups = polarity_groups(val_items)
    baseline = _candidate(0, 0.0, scores, 0, letters, groups)
    candidates = [
        _candidate(j, a, scores, row, letters, groups) for row, (j, a) in enumerate(configs, start=1)
    ]
    chosen = best_candidate(candidates, sign, criterion)
    evidence = SelectionEvidence(
        labels=[f"top-{j} heads, α={a:g}" for j, a in configs],
        p_matching=scores.p_matching[1:].double(),
        matching=scores.matching[1:].double(),
        baseline_p=scores.p_matching[0].double(),
        baseline_matching=scores.matching[0].double(),
        item_ids=[t.id for t in scorer.targets],
        polarities=[matching_polarity(item) for item in val_items],
        chosen_index=candidates.index(chosen),
        direction=int(sign),
    )
    if control is not None and control_seeds:
        evidence.control_p, evidence.control_matching = _control_rows(
            scorer, ranked_heads, configs, control, control_seeds
        )
        evidence.control_seeds, evidence.control_kind = tuple(control_seeds), control_kind
    heads = list(ranked_heads[: chosen.k])
    return Selection(heads, chosen.alpha, chosen, baseline, candidates, evidence, criterion)
