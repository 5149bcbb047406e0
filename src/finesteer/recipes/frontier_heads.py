"""HSI-style head steering towards refusal, for the frontier: per-head directions from the refusal
contrast pairs, the k most separating heads, each pushed by α·σ along its own direction.

HSI (Darm & Riccardi 2025) finds its heads by an A/B sweep; the refusal task has no A/B items, so
heads are ranked here by how well their direction separates refusing from complying answers:
d = (mean projection of refusals − of compliances) / σ at the answer's last token (one capture of
every head). The steering is `HeadDirections.intervention(top-k, α)` (HSI's θ = α·σ·v̂, at the last
position by default), swept over strength like the residual methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from finesteer.activations.directions import HeadDirections, capture_heads, directions_from_activations
from finesteer.data.prompts import chat_prompt
from finesteer.fit.steering import Steering
from finesteer.sites import Head

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

Triple = tuple[str, str, str]


def separating_heads(
    lm: LoadedModel, triples: Sequence[Triple], *, batch_size: int = 8
) -> tuple[list[tuple[Head, float]], HeadDirections]:
    """Every head with its standardised separation d, best first, and the fitted `HeadDirections`."""
    inputs: list[tuple[str, str]] = []
    labels: list[bool] = []
    for question, refusal, compliance in triples:
        prompt = chat_prompt(lm.tokenizer, question)
        inputs += [(prompt, refusal), (prompt, compliance)]
        labels += [True, False]
    z = capture_heads(lm, inputs, position="last", batch_size=batch_size)
    directions = directions_from_activations(z, labels)
    mask = torch.tensor(labels)
    proj = torch.einsum("nlhd,lhd->nlh", z.double(), directions.directions.double())
    gap = proj[mask].mean(0) - proj[~mask].mean(0)
    d = torch.where(
        directions.sigma > 0, gap / directions.sigma.double().clamp_min(1e-12), torch.zeros_like(gap)
    )
    ranked = sorted(
        (((layer, head), float(d[layer, head])) for layer in range(d.shape[0]) for head in range(d.shape[1])),
        key=lambda item: -item[1],
    )
    return ranked, directions


def head_steering(
    lm: LoadedModel,
    triples: Sequence[Triple],
    *,
    k: int = 8,
    alpha: float = 8.0,
    scope: str = "last",
    name: str = "head_steer",
) -> Steering:
    """The top-k separating heads steered by α·σ·v̂ each (`scaled(λ)` multiplies α)."""
    ranked, directions = separating_heads(lm, triples)
    heads = [head for head, _ in ranked[:k]]
    intervention = directions.intervention(heads, alpha, scope)
    metadata = {
        "method": "head_steer",
        "heads": [list(h) for h in heads],
        "separation": [round(score, 4) for _, score in ranked[:k]],
        "alpha": alpha,
        "scope": scope,
        "n_pairs": len(triples),
    }
    return Steering(name, intervention, metadata, lm=lm)


__all__ = ["head_steering", "separating_heads"]
