"""Refusal-direction head scores: how much each head writes along the refusal direction.

A head's contribution to the residual stream at a position is W_O[:, h]·z_h (its slice of the
output projection times its attention output, the o_proj input). Projected on the unit refusal
direction r̂ it is one number per head; the score is its mean over harmful prompts minus its mean
over harmless prompts, at the last prompt token. All heads of all layers come from ONE forward pass
per batch (z captured at every layer), with no ablation: unlike Ships' KL (zero gradient at the
unmodified model) the score is first order, signed (positive = the head pushes toward refusal on
harmful prompts more than on harmless ones), and costs as much as one capture.

`ranking_agreement` compares head tables: Spearman over all heads and the top-k overlap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from finesteer.activations.capture import capture
from finesteer.errors import FinesteerError
from finesteer.locate.rank_stats import spearman, top_k_overlap
from finesteer.locate.scores import HeadScores, hash_prompts
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

METHOD = "refusal_direction"


class HeadDirectionError(FinesteerError, ValueError):
    """A direction or prompt set the head-direction score cannot use."""


def head_projections(
    lm: LoadedModel, prompts: Sequence[str], direction: Tensor, *, batch_size: int = 8
) -> Tensor:
    """[n_prompts, n_layers, n_heads]: r̂ · (W_O[:, h] z_h) at each prompt's last token."""
    if not prompts:
        raise HeadDirectionError("no prompts to score heads on")
    direction = torch.as_tensor(direction).detach().double().cpu()
    if direction.shape != (lm.info.hidden_size,) or float(direction.norm()) == 0:
        raise HeadDirectionError(f"direction must be a non-zero vector of {lm.info.hidden_size} values")
    unit = direction / direction.norm()
    info, dim = lm.info, lm.info.head_dim
    sites = [Site(layer, "z") for layer in range(info.n_layers)]
    acts = capture(lm, prompts, sites, position="last", batch_size=batch_size)
    out = torch.empty(len(prompts), info.n_layers, info.n_heads, dtype=torch.float64)
    for layer, site in enumerate(sites):
        o_proj = lm.adapter.attn_part(lm.model, layer, lm.adapter.o_proj)
        weight = lm.adapter.weight(o_proj).detach().double().cpu()  # [hidden, n_heads·head_dim]
        read = (unit @ weight).reshape(info.n_heads, dim)  # r̂ᵀ W_O, one head_dim slice per head
        out[:, layer] = torch.einsum("phd,hd->ph", acts[site].double(), read)
    return out


def head_direction_scores(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    direction: Tensor,
    *,
    batch_size: int = 8,
) -> HeadScores:
    """mean_harmful − mean_harmless of each head's projection on r̂, as a head table (per-prompt harmful
    projections minus the harmless mean kept in `per_prompt`)."""
    pos = head_projections(lm, harmful, direction, batch_size=batch_size)
    neg = head_projections(lm, harmless, direction, batch_size=batch_size)
    per_prompt = (pos - neg.mean(0)).float()
    return HeadScores(
        scores=per_prompt.mean(0),
        method=METHOD,
        model_name=lm.name,
        model_fingerprint=lm.fingerprint,
        prompts_hash=hash_prompts([*harmful, "\x00harmless", *harmless]),
        n_prompts=len(harmful) + len(harmless),
        extra={
            "score": "r̂·(W_O[:,h] z_h) at the last token, harmful − harmless mean",
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
        },
        per_prompt=per_prompt,
    )


def ranking_agreement(tables: Mapping[str, HeadScores], k: int = 10) -> list[dict[str, Any]]:
    """One row per pair of tables: Spearman over all heads, top-k overlap (count) and Jaccard."""
    names = list(tables)
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = tables[first], tables[second]
            if a.shape != b.shape:
                raise HeadDirectionError(f"tables {first} {a.shape} and {second} {b.shape} differ in shape")
            overlap = top_k_overlap(a.scores, b.scores, k)
            rows.append(
                {
                    "a": first,
                    "b": second,
                    "spearman": round(spearman(a.scores, b.scores), 4),
                    f"top{k}_overlap": overlap,
                    f"top{k}_jaccard": round(overlap / (2 * k - overlap), 4),
                }
            )
    return rows


__all__ = ["METHOD", "HeadDirectionError", "head_direction_scores", "head_projections", "ranking_agreement"]
