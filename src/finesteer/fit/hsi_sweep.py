"""HSI's locate half: split the training items, read directions, sweep every head alone over an α grid.

`sweep_hsi_heads` is what `finesteer locate hsi` runs; it is the part of `fit_hsi` before the
top-k and α choice (directions from the training items minus `n_sweep` held-out items, on which
every head, or a subset, is steered alone with each α). With `run_dir` the directions, sampled
answers and per-layer sweep checkpoints are written there, a rerun resumes, and the head table is
saved to `run_dir/head_scores`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesteer.activations.directions import HeadDirections, LabelledCompletion
from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.fit.hsi import split_items, validate_heads
from finesteer.fit.hsi_directions import DirectionsFrom, check_directions_from, hsi_directions
from finesteer.locate.hsi import sweep_heads
from finesteer.locate.hsi_table import HsiSweep, RankBy, check_alphas
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt
from finesteer.sites import Head

log = logging.getLogger(__name__)

HEAD_SCORES_DIR = "head_scores"


@dataclass
class HeadSweep:
    """A finished sweep and what it was read from."""

    sweep: HsiSweep
    directions: HeadDirections
    n_direction_items: int
    n_sweep_items: int
    source: dict[str, Any] = field(default_factory=dict)  # directions_from, n_completions, sampled


def sweep_hsi_heads(
    lm: LoadedModel,
    items: Sequence[ABItem],
    alphas: Sequence[float],
    *,
    n_sweep: int = 24,
    seed: int = 0,
    heads: Iterable[Head] | None = None,
    directions_from: str = "ab",
    completions: Sequence[LabelledCompletion] = (),
    n_samples: int = 2,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    balance_letters: bool = False,
    rank_by: RankBy = "balanced",
    run_dir: Path | None = None,
    progress: bool = True,
) -> HeadSweep:
    """Directions from `items` minus `n_sweep` held-out items, then every head swept alone on those.

    `balance_letters` scores the sweep (and reads directions) on every item in both option orders.
    """
    grid = check_alphas(alphas)
    source_kind: DirectionsFrom = check_directions_from(directions_from)
    subset = validate_heads(lm, heads) if heads is not None else None
    direction_items, sweep_items = split_items(items, n_sweep, seed)
    if balance_letters:
        direction_items = letter_balanced(direction_items, strict=False)
        sweep_items = letter_balanced(sweep_items, strict=False)
    log.info(
        "HSI sweep on %s: directions from %d items, sweep on %d, α = %s",
        lm.name,
        len(direction_items),
        len(sweep_items),
        list(grid),
    )
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    directions, source = hsi_directions(
        lm,
        direction_items,
        run_dir,
        directions_from=source_kind,
        completions=completions,
        n_samples=n_samples,
        prompt=prompt,
        progress=progress,
    )
    sweep = sweep_heads(
        lm,
        sweep_items,
        directions,
        grid,
        heads=subset,
        prompt=prompt,
        batch_size=batch_size,
        run_dir=run_dir,
        progress=progress,
    )
    if run_dir is not None:
        scores = sweep.head_scores(rank_by, model_name=lm.name, model_fingerprint=lm.fingerprint)
        scores.save(run_dir / HEAD_SCORES_DIR)
    return HeadSweep(sweep, directions, len(direction_items), len(sweep_items), source)
