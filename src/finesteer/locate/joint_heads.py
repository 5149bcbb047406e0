"""Joint head sets: forward selection on the first-token refusal proxy, exact at every step.

Greedy top-k takes each head's solo score and misses heads that act together (one head's effect can
depend on another being gone). Forward selection grows the set one head at a time: at every step
each remaining head of the candidate pool is scored *exactly*, by ablating it together with the
heads already chosen and reading the refusal log-odds on harmful prompts
(`finesteer.locate.refusal_proxy`), and the one that lowers refusal most joins the set. The pool
comes from the head rankings (`candidate_pool`: the union of each table's top heads), so the cost is
|pool| hooked scans per step rather than every head. The search over sets and ablation strength
that also weighs harmless KL is `finesteer.locate.joint_search`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from finesteer.errors import FinesteerError, check_count
from finesteer.interventions.edit import Intervention
from finesteer.locate.engine import EncodedPrompts, as_encoded
from finesteer.locate.refusal_proxy import harmless_kl, refusal_scores
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import ablation
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, check_heads


class JointHeadsError(FinesteerError, ValueError):
    """A head-set search that cannot run (empty pool, k larger than the pool, bad strength)."""


def head_name(head: Head) -> str:
    return f"{head[0]}.{head[1]}"


def candidate_pool(tables: Sequence[HeadScores], per_table: int) -> list[Head]:
    """The union of each table's `per_table` best heads, in order of first appearance (table by table)."""
    check_count(per_table, "per_table")
    pool: list[Head] = []
    for table in tables:
        pool.extend(h for h in table.top_heads(per_table) if h not in pool)
    return pool


def head_set_ablation(heads: Sequence[Head], mode: str = "sc", strength: float = 1.0) -> Intervention:
    """Ablate `heads` together at `strength` ∈ [0, 1] (1 = Ships' ε-ablation; 0 = no-op): the head's
    output (sc) or query (ua) × (1 − strength·(1 − ε))."""
    if not 0.0 <= strength <= 1.0:
        raise JointHeadsError(f"strength must be in [0, 1], got {strength}")
    eps = 1e-5
    return ablation(list(heads), mode, 1.0 - strength * (1.0 - eps)) if heads else Intervention()


@dataclass(frozen=True)
class SelectionStep:
    """One step: the set after it, its refusal log-odds (and harmless KL when measured), and the
    exact score of every candidate tried at this step ({head: refusal log-odds})."""

    heads: tuple[Head, ...]
    refusal: float
    kl: float | None
    candidates: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "heads": [head_name(h) for h in self.heads],
            "refusal": self.refusal,
            "kl": self.kl,
            "candidates": self.candidates,
        }


def forward_selection(
    lm: LoadedModel,
    harmful: EncodedPrompts | Sequence[str],
    pool: Sequence[Head],
    k: int,
    *,
    harmless: EncodedPrompts | Sequence[str] | None = None,
    base_logits: Tensor | None = None,
    mode: str = "sc",
    strength: float = 1.0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[SelectionStep]:
    """Grow a head set of size `k` from `pool`, each step adding the head whose joint ablation gives the
    lowest mean refusal log-odds on `harmful`; with `harmless` and `base_logits`, each step's set
    also gets its harmless next-token KL."""
    pool = check_heads(list(pool), lm.info.n_layers, lm.info.n_heads)
    check_count(k, "k")
    if k > len(pool):
        raise JointHeadsError(f"k = {k} is larger than the candidate pool ({len(pool)} heads)")
    encoded = as_encoded(lm, harmful)
    chosen: list[Head] = []
    steps = []
    for step in range(k):
        remaining = [h for h in pool if h not in chosen]
        sets = [[*chosen, h] for h in remaining]
        candidates = [head_set_ablation(s, mode, strength) for s in sets]
        values = (
            refusal_scores(
                lm,
                encoded,
                candidates,
                batch_size=batch_size,
                progress=progress,
                desc=f"forward step {step + 1}",
            )
            .mean(1)
            .tolist()
        )
        best = min(range(len(remaining)), key=lambda i: (values[i], i))
        chosen.append(remaining[best])
        kl = None
        if harmless is not None and base_logits is not None:
            kl = float(
                harmless_kl(lm, harmless, [candidates[best]], base_logits, batch_size=batch_size).mean()
            )
        scores = {head_name(h): round(v, 6) for h, v in zip(remaining, values, strict=True)}
        steps.append(SelectionStep(tuple(chosen), values[best], kl, scores))
    return steps


__all__ = [
    "JointHeadsError",
    "SelectionStep",
    "candidate_pool",
    "forward_selection",
    "head_name",
    "head_set_ablation",
]
