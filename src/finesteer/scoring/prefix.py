"""Prefix KV caches for scoring many interventions that only touch the last K prompt tokens.

The prompts of a batch without their last K tokens are run once, left padded (so the K tail tokens
of every row follow its prefix directly), and their KV cache is kept. The tail is then re-run on top
of it: as many rows per prompt as there are interventions (`run_rows`, K = 1 in practice), or once
per intervention with the cache rolled back afterwards (`run_tail`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.scoring.forward import ScoringError, applied


@dataclass
class PrefixBatch:
    """The KV cache of a batch of prompts without their last `k` tokens, and those tail tokens.

    `indices` are the batch's rows in the scored item list; `mask` the prefix's (left-padded)
    attention mask; `tail_ids` / `tail_positions` [B, k]. A `croppable` cache is rolled back after
    each tail forward instead of being copied.
    """

    indices: list[int]
    k: int
    cache: Any
    mask: Tensor
    tail_ids: Tensor
    tail_positions: Tensor
    croppable: bool


def build_prefix(
    lm: LoadedModel,
    sequences: Sequence[Sequence[int]],
    indices: Sequence[int],
    k: int,
    *,
    rollback: bool = False,
    ids: Sequence[str] | None = None,
) -> PrefixBatch:
    """Run every sequence but its last `k` tokens once and keep the KV cache.

    `rollback=True` prepares the cache to be cropped back after each tail forward where the cache
    class allows it (sliding-window layers then keep what a rollback needs); otherwise every tail
    forward works on a copy.
    """
    if not sequences:
        raise ScoringError("no prompts to build a prefix cache for")
    names = list(ids) if ids is not None else [str(i) for i in indices]
    for name, seq in zip(names, sequences, strict=True):
        if len(seq) <= k:
            raise ScoringError(
                f"item {name!r}: its prompt has {len(seq)} tokens; reusing the prefix before the last {k} "
                "needs more"
            )
    prefixes = [list(seq[: len(seq) - k]) for seq in sequences]
    width = max(len(p) for p in prefixes)
    prefix = torch.full((len(prefixes), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, tokens in enumerate(prefixes):  # left padding: the tail follows every prefix directly
        prefix[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    device = lm.device
    with torch.no_grad():
        cache = lm.model(
            input_ids=prefix.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(1) - 1).clamp_min(0).to(device),
            use_cache=True,
            logits_to_keep=1,  # the prefix's logits are never read; skip the vocabulary projection
        ).past_key_values
    croppable = False
    if rollback:
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        croppable = bool(getattr(cache, "is_croppable", False))
    tail_ids = torch.tensor([list(seq[len(seq) - k :]) for seq in sequences], dtype=torch.long)
    tail_positions = mask.sum(1, keepdim=True) + torch.arange(k)[None, :]
    return PrefixBatch(list(indices), k, cache, mask, tail_ids, tail_positions, croppable)


def run_rows(lm: LoadedModel, batch: PrefixBatch, chunk: Sequence[Intervention]) -> Tensor:
    """Last-position logits [n_prompts * len(chunk), vocab] (float32, CPU), prompt-major: row
    `prompt * len(chunk) + i` is prompt `prompt` under `chunk[i]` (edits without rows, tail-scoped)."""
    n, p = len(chunk), len(batch.indices)
    cache = copy.deepcopy(batch.cache)
    cache.batch_repeat_interleave(n)
    # repeat_interleave puts prompt b's copies at rows b*n .. b*n+n-1.
    per_row = Intervention.per_row([chunk[i] for _ in range(p) for i in range(n)])
    mask = torch.cat([batch.mask, torch.ones(p, batch.k, dtype=torch.long)], dim=1)
    device = lm.device
    with torch.no_grad(), intervene(lm, per_row):
        out = lm.model(
            input_ids=batch.tail_ids.repeat_interleave(n, 0).to(device),
            attention_mask=mask.repeat_interleave(n, 0).to(device),
            position_ids=batch.tail_positions.repeat_interleave(n, 0).to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float().cpu()


def run_tail(lm: LoadedModel, batch: PrefixBatch, intervention: Intervention | None) -> Tensor:
    """Next-token log-probabilities [n_prompts, vocab] (float32, CPU) after the tail, with
    `intervention` (tail-scoped, rows of this batch) applied during the tail forward."""
    device = lm.device
    work = batch.cache if batch.croppable else copy.deepcopy(batch.cache)
    mask = torch.cat([batch.mask, torch.ones((len(batch.indices), batch.k), dtype=torch.long)], dim=1)
    try:
        with torch.no_grad(), applied(lm, intervention):
            logits = lm.model(
                input_ids=batch.tail_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=batch.tail_positions.to(device),
                past_key_values=work,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
    finally:
        if batch.croppable:
            batch.cache.crop(-batch.k)  # a negative count removes that many tokens
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    if torch.isnan(logp).any():
        raise ScoringError("the model produced NaN logits (check the intervention's scale)")
    return logp


__all__ = ["PrefixBatch", "build_prefix", "run_rows", "run_tail"]
