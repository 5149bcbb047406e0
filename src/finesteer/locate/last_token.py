"""Exact, fast A/B letter-probability scoring of many last-token interventions.

An HSI/ITI edit with scope "last" touches only the final prompt token (the "(" whose next-token
logits give the answer letter). Every position before it is therefore identical for every (head, α)
being tried, so its KV cache is computed once per prompt batch, copied along the batch dimension,
and only the last token is run for many intervention rows at once (`Intervention.per_row`). This
gives the same numbers as a full forward with the intervention (tests compare them) at the cost of
one token per row.

The metric is CAA's, read exactly as `finesteer.evaluate.ab` reads it: at the last position,
p(matching letter) normalised over the item's option letters; an item counts as matching when its
matching letter has the highest probability (ties to the earlier option).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.data.items import ABItem
from finesteer.data.prompts import ab_prompt
from finesteer.errors import FinesteerError
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention, InterventionError
from finesteer.models.loading import LoadedModel


class ScoringError(FinesteerError, ValueError):
    """A/B items that cannot be scored (no items, letters that are not single tokens)."""


@dataclass(frozen=True)
class ABTarget:
    """One tokenised A/B prompt: its ids, the token id of each option letter, which one matches."""

    prompt_ids: tuple[int, ...]
    option_ids: tuple[int, ...]
    matching_index: int
    id: str


@dataclass(frozen=True)
class OptionScores:
    """p_matching [n_interventions, n_items] and whether the matching letter was the top option."""

    p_matching: Tensor
    matching: Tensor

    @property
    def mean_p_matching(self) -> Tensor:
        return self.p_matching.mean(dim=-1)

    @property
    def matching_rate(self) -> Tensor:
        return self.matching.float().mean(dim=-1)


def prepare_targets(
    tokenizer: Any, items: Sequence[ABItem], *, system: str | None = None, prefill: str = "("
) -> list[ABTarget]:
    """Tokenise the A/B prompts exactly as `finesteer.evaluate.ab.letter_probabilities` does.

    The token sequence and option-letter ids come from `letter_targets` (including its "(A"-merged
    tokenizer mode), so a sweep's numbers are the comparison's numbers, not a near relative.
    """
    from finesteer.evaluate.ab import letter_targets

    if not items:
        raise ScoringError("no A/B items to score")
    targets = []
    for item in items:
        letters = item.options
        if len(letters) < 2:
            raise ScoringError(f"item {item.id!r} lists no '(A)'/'(B)' answer options in its question")
        prompt = ab_prompt(tokenizer, item, system=system, prefill=prefill)
        found = letter_targets(tokenizer, prompt, letters, prefill=prefill, item_id=item.id)
        if len(found.tokens) < 2:
            raise ScoringError(f"item {item.id!r}: prompt has fewer than 2 tokens")
        option_ids = tuple(found.letter_ids[letter] for letter in letters)
        targets.append(ABTarget(found.tokens, option_ids, letters.index(item.matching_letter), item.id))
    return targets


def _option_scores(logits: Tensor, targets: Sequence[ABTarget]) -> tuple[Tensor, Tensor]:
    """p_matching and matching for rows of last-position logits, one target per row."""
    probs, matches = [], []
    for row, target in enumerate(targets):
        option_logits = logits[row, list(target.option_ids)].double()
        p = torch.softmax(option_logits, dim=-1)
        probs.append(p[target.matching_index])
        matches.append(bool(int(option_logits.argmax()) == target.matching_index))
    return torch.stack(probs).float(), torch.tensor(matches)


def _check_last_only(intervention: Intervention) -> None:
    for edit in intervention.edits:
        if edit.scope.kind != "last":
            raise InterventionError(
                f"edit at {edit.site} has scope '{edit.scope}'; the cached-prefix scorer is exact only for "
                "scope 'last' (use score_full_forward for other scopes)"
            )
        if edit.rows is not None:
            raise InterventionError(f"edit at {edit.site} already targets batch rows {edit.rows}")


@dataclass
class _PrefixBatch:
    """KV cache of a batch of prompts without their last token (left padded), and what comes next."""

    targets: list[ABTarget]
    cache: Any
    prefix_mask: Tensor
    last_ids: Tensor
    last_positions: Tensor


class LastTokenScorer:
    """Scores A/B items under many scope-'last' interventions, reusing each prompt's prefix cache.

    The prefix caches are built once at construction (memory: one KV cache per prompt), then
    `score` can be called for any number of intervention lists (per layer of a sweep, per α, …).
    """

    def __init__(
        self, lm: LoadedModel, targets: Sequence[ABTarget], *, batch_size: int = 8, max_rows: int = 128
    ) -> None:
        if not targets:
            raise ScoringError("no A/B items to score")
        if batch_size < 1 or max_rows < 1:
            raise ScoringError(f"batch_size and max_rows must be ≥ 1, got {batch_size}, {max_rows}")
        self.lm = lm
        self.targets = list(targets)
        self.max_rows = max_rows
        self._batches = [
            self._prefix(self.targets[start : start + batch_size])
            for start in range(0, len(self.targets), batch_size)
        ]

    def _prefix(self, targets: list[ABTarget]) -> _PrefixBatch:
        lm = self.lm
        width = max(len(t.prompt_ids) - 1 for t in targets)
        pad = lm.tokenizer.pad_token_id
        ids = torch.full((len(targets), width), pad, dtype=torch.long)
        mask = torch.zeros((len(targets), width), dtype=torch.long)
        for row, target in enumerate(targets):
            prefix = target.prompt_ids[:-1]
            ids[row, width - len(prefix) :] = torch.tensor(prefix)
            mask[row, width - len(prefix) :] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            out = lm.model(
                input_ids=ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=positions.to(lm.device),
                use_cache=True,
                logits_to_keep=1,
            )
        last_ids = torch.tensor([[t.prompt_ids[-1]] for t in targets])
        last_positions = mask.sum(1, keepdim=True)
        return _PrefixBatch(targets, out.past_key_values, mask, last_ids, last_positions)

    def _run(self, batch: _PrefixBatch, chunk: Sequence[Intervention]) -> Tensor:
        """Last-position logits [n_prompts * len(chunk), vocab], prompt-major (row = prompt * n + i)."""
        lm = self.lm
        n, p = len(chunk), len(batch.targets)
        cache = copy.deepcopy(batch.cache)
        cache.batch_repeat_interleave(n)
        # repeat_interleave puts prompt b's copies at rows b*n .. b*n+n-1.
        per_row = Intervention.per_row([chunk[i] for _ in range(p) for i in range(n)])
        mask = torch.cat([batch.prefix_mask, torch.ones(p, 1, dtype=torch.long)], dim=1)
        with torch.no_grad(), intervene(lm, per_row):
            out = lm.model(
                input_ids=batch.last_ids.repeat_interleave(n, 0).to(lm.device),
                attention_mask=mask.repeat_interleave(n, 0).to(lm.device),
                position_ids=batch.last_positions.repeat_interleave(n, 0).to(lm.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float().cpu()

    def score(self, interventions: Sequence[Intervention], *, progress: bool = False) -> OptionScores:
        """OptionScores for each intervention (rows) on every item (columns)."""
        if not interventions:
            raise ScoringError("no interventions to score")
        for intervention in interventions:
            intervention.validate(self.lm.info)
            _check_last_only(intervention)
        n_items = len(self.targets)
        p_matching = torch.empty(len(interventions), n_items)
        matching = torch.empty(len(interventions), n_items, dtype=torch.bool)
        jobs = []
        offset = 0
        for batch in self._batches:
            step = max(1, self.max_rows // len(batch.targets))
            for start in range(0, len(interventions), step):
                jobs.append((batch, offset, start, min(start + step, len(interventions))))
            offset += len(batch.targets)
        for batch, col, start, stop in tqdm(
            jobs, desc="score", disable=not progress, unit="chunk", leave=False
        ):
            logits = self._run(batch, interventions[start:stop])
            n = stop - start
            rows_targets = [t for t in batch.targets for _ in range(n)]
            p, m = _option_scores(logits, rows_targets)
            p_matching[start:stop, col : col + len(batch.targets)] = p.view(len(batch.targets), n).T
            matching[start:stop, col : col + len(batch.targets)] = m.view(len(batch.targets), n).T
        return OptionScores(p_matching, matching)


def score_full_forward(
    lm: LoadedModel, targets: Sequence[ABTarget], intervention: Intervention | None = None
) -> OptionScores:
    """Reference path: each prompt alone, full forward with the intervention; any scope allowed."""
    if not targets:
        raise ScoringError("no A/B items to score")
    logits = []
    with intervene(lm, intervention or Intervention()), torch.no_grad():
        for target in targets:
            ids = torch.tensor([target.prompt_ids], device=lm.device)
            out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            logits.append(out.logits[0, -1].float().cpu())
    p, m = _option_scores(torch.stack(logits), targets)
    return OptionScores(p[None], m[None])
