"""Prefix KV caches for scoring many interventions that only touch the last K prompt tokens.

The prompts of a batch without their last K tokens are run once, left padded (so the K tail tokens
of every row follow its prefix directly), and their KV cache is kept. The tail is then re-run on top
of it: as many rows per prompt as there are interventions (`run_rows`, K = 1 in practice), or once
per intervention with the cache rolled back afterwards (`run_tail`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations.padding import pad
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention, InterventionError
from finesteer.interventions.scope import Scope
from finesteer.models.loading import LoadedModel
from finesteer.scoring.forward import ScoringError, applied, rows_for_batch


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
    # left padding: the tail follows every prefix directly
    prefix, mask = pad(prefixes, "left", lm.tokenizer.pad_token_id)
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


def prefix_batches(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], ids: Sequence[str], k: int, batch_size: int
) -> list[PrefixBatch]:
    """`build_prefix` over consecutive batches of `batch_size` sequences (rolled back after each tail
    forward when k > 1, copied for the row-batched k = 1 path)."""
    starts = range(0, len(sequences), batch_size)
    batches = [list(range(start, min(start + batch_size, len(sequences)))) for start in starts]
    return [
        build_prefix(lm, [sequences[i] for i in rows], rows, k, rollback=k > 1, ids=[ids[i] for i in rows])
        for rows in batches
    ]


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


def tail_scoped(intervention: Intervention, k: int, *, allow_rows: bool) -> Intervention:
    """`intervention` rewritten for a forward of only the last `k` tokens on top of a prefix cache.

    Exact only for edits that touch nothing before those tokens: scope "last", or "from_end:k"
    (which becomes "all" on the k-token call). Raises `InterventionError` otherwise.
    """
    edits = []
    for edit in intervention.edits:
        scope = edit.scope
        if scope.kind == "from_end" and scope.start is not None and scope.start[0] == k:
            edit = replace(edit, scope=Scope.parse("all"))
        elif scope.kind != "last":
            allowed = "'last'" if k == 1 else f"'last' or 'from_end:{k}'"
            raise InterventionError(
                f"edit at {edit.site} has scope '{scope}'; reusing the prefix before the last {k} "
                f"token(s) is exact only for scope {allowed} (use reuse_prefix=None for other scopes)"
            )
        if edit.rows is not None and not allow_rows:
            raise InterventionError(f"edit at {edit.site} already targets batch rows {edit.rows}")
        edits.append(edit)
    return Intervention(tuple(edits))


def last_token_rows(
    lm: LoadedModel,
    batches: Sequence[PrefixBatch],
    interventions: Sequence[Intervention | None],
    max_rows: int,
    *,
    progress: bool = False,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """(intervention index, item index, last-position logits, their logsumexp) for every pair, running
    up to `max_rows` rows (prompts × interventions) per forward on 1-token prefix batches."""
    edits = [tail_scoped(iv or Intervention(), 1, allow_rows=False) for iv in interventions]
    jobs = []
    for batch in batches:
        step = max(1, max_rows // len(batch.indices))
        jobs += [(batch, start, min(start + step, len(edits))) for start in range(0, len(edits), step)]
    for batch, start, stop in tqdm(jobs, desc="score", disable=not progress, unit="chunk", leave=False):
        logits = run_rows(lm, batch, edits[start:stop])  # prompt-major rows
        log_norm = torch.logsumexp(logits.double(), dim=-1)
        n = stop - start
        for p, item in enumerate(batch.indices):
            for c in range(n):
                yield start + c, item, logits[p * n + c], log_norm[p * n + c]


def tail_rows(
    lm: LoadedModel,
    batches: Sequence[PrefixBatch],
    interventions: Sequence[Intervention | None],
    *,
    progress: bool = False,
) -> Iterator[tuple[int, int, Tensor]]:
    """(intervention index, item index, next-token log-probabilities) for every pair: the K-token
    tail of each batch re-run once per intervention (per-row edits name rows of the item list)."""
    edits = [None if iv is None else tail_scoped(iv, batches[0].k, allow_rows=True) for iv in interventions]
    for batch in tqdm(batches, desc="A/B tail sweep", disable=not progress, unit="batch"):
        for r, edit in enumerate(edits):
            logp = run_tail(lm, batch, rows_for_batch(edit, batch.indices))
            for row, item in enumerate(batch.indices):
                yield r, item, logp[row]


__all__ = [
    "PrefixBatch",
    "build_prefix",
    "last_token_rows",
    "prefix_batches",
    "run_rows",
    "run_tail",
    "tail_rows",
    "tail_scoped",
]
