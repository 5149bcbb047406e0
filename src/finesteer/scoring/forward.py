"""The scoring forward: right-padded batches, and per-row interventions that follow items across batches.

Evaluation reads next-token distributions at chosen positions (the answer letter after "(", an
option's tokens, the last prompt token). Batches are right-padded so every real token keeps the
position it has when the prompt runs alone: a batched score then equals an unbatched one.

Row-specific edits (`Intervention.per_row`) name rows of *the evaluated item list*, not of one
batch: `rows_for_batch` re-indexes them for each batch, so a scan gives the same numbers whatever
the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations.padding import pad
from finesteer.errors import FinesteerError
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention, InterventionError
from finesteer.models.loading import LoadedModel


class ScoringError(FinesteerError, ValueError):
    """Scoring that cannot give a meaningful number (no items, untokenisable answer, NaN logits)."""


def check_rows(intervention: Intervention | None, n_items: int) -> None:
    """Refuse row-specific edits that name an item beyond the list (they would silently do nothing)."""
    if intervention is None:
        return
    for edit in intervention.edits:
        if edit.rows is not None and edit.rows and max(edit.rows) >= n_items:
            raise InterventionError(
                f"edit at {edit.site} targets item row {max(edit.rows)} but only {n_items} items are "
                "evaluated (per-row interventions name rows of the item list)"
            )


def has_row_edits(intervention: Intervention | None) -> bool:
    return intervention is not None and any(edit.rows is not None for edit in intervention.edits)


def rows_for_batch(intervention: Intervention | None, indices: Sequence[int]) -> Intervention | None:
    """The edits that apply to a batch made of the items `indices`, rows renumbered 0..len-1.

    Edits without rows apply to every row and are kept as they are; a row-specific edit keeps only
    the rows in this batch and is dropped when none are.
    """
    if intervention is None or not has_row_edits(intervention):
        return intervention
    position = {item: row for row, item in enumerate(indices)}
    edits = []
    for edit in intervention.edits:
        if edit.rows is None:
            edits.append(edit)
            continue
        rows = tuple(position[r] for r in edit.rows if r in position)
        if rows:
            edits.append(replace(edit, rows=rows))
    return Intervention(tuple(edits))


def applied(lm: LoadedModel, intervention: Intervention | None) -> Any:
    """Context manager applying `intervention` (or nothing)."""
    return intervene(lm, intervention) if intervention is not None else nullcontext()


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, S] input ids and attention mask, each row's tokens first, padding after."""
    if not sequences:
        raise ScoringError("no sequences to batch")
    width = max(len(s) for s in sequences)
    if width == 0:
        raise ScoringError("cannot score an empty token sequence")
    for row, tokens in enumerate(sequences):
        if not tokens:
            raise ScoringError(f"row {row} has no tokens")
    return pad(sequences, "right", pad_id)


def log_probs_at(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> Tensor:
    """Next-token log-probabilities [B, K, V] (float32) at `positions[b]` (K per row) of each sequence.

    One forward over the right-padded batch. Only the requested positions are projected onto the
    vocabulary (HF `logits_to_keep` with per-row indices), so memory stays small for long prompts.
    """
    counts = {len(p) for p in positions}
    if len(counts) != 1 or len(positions) != len(sequences):
        raise ScoringError("log_probs_at needs the same number of positions for every sequence")
    for row, (seq, pos) in enumerate(zip(sequences, positions, strict=True)):
        if any(not 0 <= p < len(seq) for p in pos):
            raise ScoringError(f"row {row}: positions {list(pos)} outside a sequence of {len(seq)} tokens")
    ids, mask = right_pad(sequences, lm.tokenizer.pad_token_id)
    index = torch.tensor([list(p) for p in positions], dtype=torch.long)
    device = lm.device
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    with torch.no_grad():
        try:
            logits = lm.model(**inputs, logits_to_keep=index.to(device)).logits
        except TypeError:  # a model class whose forward has no logits_to_keep
            logits = lm.model(**inputs).logits
    if logits.shape[1] != index.shape[1]:  # every position was projected: pick the requested ones
        if logits.shape[1] != ids.shape[1]:
            raise ScoringError(f"model returned logits for {logits.shape[1]} positions of {ids.shape[1]}")
        logits = torch.take_along_dim(logits, index.to(logits.device)[..., None], dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    if torch.isnan(logp).any():
        raise ScoringError("the model produced NaN logits (check the intervention's scale)")
    return logp


def token_log_probs(
    lm: LoadedModel, sequences: Sequence[Sequence[int]], starts: Sequence[int]
) -> list[Tensor]:
    """Log-probability of every token of `sequences[b]` from index `starts[b]` on, given the tokens before.

    Returns one float32 tensor per row (length `len(seq) - start`). `starts[b]` must be ≥ 1: the
    first token has no prediction. One forward for the whole batch.
    """
    positions: list[list[int]] = []
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        if not 1 <= start < len(seq):
            raise ScoringError(f"row {row}: scored span starts at {start} in a sequence of {len(seq)} tokens")
        positions.append(list(range(start - 1, len(seq) - 1)))
    width = max(len(p) for p in positions)
    padded = [p + [p[-1]] * (width - len(p)) for p in positions]
    logp = log_probs_at(lm, sequences, padded)
    out = []
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        targets = torch.tensor(list(seq[start:]), dtype=torch.long)
        out.append(logp[row, : len(targets)].gather(1, targets[:, None])[:, 0])
    return out


def full_rows(
    lm: LoadedModel,
    sequences: Sequence[Sequence[int]],
    interventions: Sequence[Intervention | None],
    batch_size: int,
    *,
    progress: bool = False,
) -> Iterator[tuple[int, int, Tensor]]:
    """(intervention index, sequence index, next-token log-probabilities after the sequence) for every
    pair: one right-padded forward per batch and intervention, batches of similar length (less
    padding; per-row edits follow their sequence, so the order changes no number)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    jobs = [(r, start) for r in range(len(interventions)) for start in range(0, len(sequences), batch_size)]
    for r, start in tqdm(jobs, desc="A/B letter probabilities", disable=not progress, unit="batch"):
        indices = order[start : start + batch_size]
        batch = [sequences[i] for i in indices]
        with applied(lm, rows_for_batch(interventions[r], indices)):
            logp = log_probs_at(lm, batch, [[len(s) - 1] for s in batch])[:, 0]
        for row, i in enumerate(indices):
            yield r, i, logp[row]
