"""HSI's locate half: split the training items, read directions, sweep every head alone over an α grid.

`sweep_split` is the part of `fit_hsi` before the top-k and α choice (directions from the training
items minus `n_sweep` held-out items, on which every head, or a subset, is steered alone with each
α); `sweep_hsi_heads` is what `finesteer locate hsi` runs. With `run_dir` the directions, sampled
answers and per-layer sweep checkpoints are written there, a rerun resumes, and the head table is
saved to `run_dir/head_scores`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesteer.activations.directions import HeadDirections, LabelledCompletion
from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.fit.hsi_directions import DirectionsFrom, check_directions_from, hsi_directions, items_hash
from finesteer.locate.hsi import sweep_heads
from finesteer.locate.hsi_table import HsiSweep, RankBy, check_alphas
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt
from finesteer.sites import Head, check_heads

log = logging.getLogger(__name__)

HEAD_SCORES_DIR = "head_scores"


class HSIConfigError(FinesteerError, ValueError):
    """HSI settings that cannot work (k < 1, an unknown rank or directions source, a bad α grid)."""


def split_items(items: Sequence[ABItem], n_held_out: int, seed: int = 0) -> tuple[list[ABItem], list[ABItem]]:
    """(rest, held_out): `n_held_out` items (at most half) set aside, balanced by matching letter.

    Each letter's items are shuffled with `seed` and dealt round-robin, so a held-out set has as
    many "(A)"- as "(B)"-matching items as possible (a letter-preference shift then cannot pass
    for a behaviour change); the order of `rest` follows the input.
    """
    if len(items) < 2:
        raise HSIConfigError(f"need at least 2 training items to split, got {len(items)}")
    if isinstance(n_held_out, bool) or not isinstance(n_held_out, int) or n_held_out < 1:
        raise HSIConfigError(f"the held-out split needs ≥ 1 item, got {n_held_out!r}")
    n = min(n_held_out, len(items) // 2)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.matching_letter, []).append(index)
    queues = []
    for letter in sorted(groups):
        indices = groups[letter]
        rng.shuffle(indices)
        queues.append(indices)
    held_idx: list[int] = []
    while len(held_idx) < n:
        for queue in queues:
            if queue and len(held_idx) < n:
                held_idx.append(queue.pop(0))
    chosen = set(held_idx)
    return [item for i, item in enumerate(items) if i not in chosen], [items[i] for i in held_idx]


def validate_heads(lm: LoadedModel, heads: Iterable[Head]) -> list[Head]:
    """The heads as (layer, head) ints, checked against the model before any expensive step."""
    checked = check_heads(heads, lm.info.n_layers, lm.info.n_heads)
    if not checked:
        raise HSIConfigError("empty head subset")
    return checked


@dataclass(frozen=True)
class SweepPlan:
    """Which items rank the heads: `n_sweep` training items held out (split with `seed`), every head
    or `heads` steered alone on them (`max_rows` rows per cached forward), in both option orders
    with `balance_letters`."""

    n_sweep: int
    seed: int
    heads: list[Head] | None
    balance_letters: bool
    max_rows: int = 128


@dataclass(frozen=True)
class DirectionSource:
    """What the head directions are read from (see `fit_hsi`); `batch_size`: prompts per capture."""

    directions_from: DirectionsFrom
    completions: Sequence[LabelledCompletion]
    n_samples: int
    temperature: float
    batch_size: int
    balance_format: bool = False


@dataclass
class HeadSweep:
    """A finished sweep and what it was read from."""

    sweep: HsiSweep
    directions: HeadDirections
    n_direction_items: int
    n_sweep_items: int
    direction_items_hash: str
    source: dict[str, Any] = field(default_factory=dict)  # directions_from, n_completions, sampled
    seconds: dict[str, float] = field(default_factory=dict)  # directions, sweep


def sweep_split(
    lm: LoadedModel,
    items: Sequence[ABItem],
    alphas: Sequence[float],
    plan: SweepPlan,
    source: DirectionSource,
    *,
    prompt: ABPrompt,
    batch_size: int,
    run_dir: Path | None,
    progress: bool,
    backend: Backend | None = None,
) -> HeadSweep:
    """HSI's locate half: directions from `items` minus the held-out items, then every head swept
    alone on those over `alphas` (the part of `fit_hsi` before the top-k and α choice)."""
    started = time.perf_counter()
    direction_items, sweep_items = split_items(items, plan.n_sweep, plan.seed)
    if plan.balance_letters:
        direction_items = letter_balanced(direction_items, strict=False)
        sweep_items = letter_balanced(sweep_items, strict=False)
    log.info(
        "HSI sweep on %s: directions from %d items, sweep on %d, α = %s",
        lm.name,
        len(direction_items),
        len(sweep_items),
        list(alphas),
    )
    directions, record = hsi_directions(
        lm,
        direction_items,
        run_dir,
        directions_from=source.directions_from,
        completions=source.completions,
        n_samples=source.n_samples,
        temperature=source.temperature,
        prompt=prompt,
        batch_size=source.batch_size,
        progress=progress,
        balance_format=source.balance_format,
    )
    t_directions = time.perf_counter() - started
    sweep = sweep_heads(
        lm,
        sweep_items,
        directions,
        alphas,
        heads=plan.heads,
        prompt=prompt,
        batch_size=batch_size,
        max_rows=plan.max_rows,
        run_dir=run_dir,
        progress=progress,
        backend=backend,
    )
    seconds = {"directions": t_directions, "sweep": time.perf_counter() - started - t_directions}
    hashed = items_hash(direction_items)
    return HeadSweep(sweep, directions, len(direction_items), len(sweep_items), hashed, record, seconds)


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
    balance_letters: bool = True,
    balance_format: bool = False,
    rank_by: RankBy = "balanced",
    run_dir: Path | None = None,
    progress: bool = True,
    backend: Backend | None = None,
) -> HeadSweep:
    """Directions from `items` minus `n_sweep` held-out items, then every head swept alone on those.

    `balance_letters` scores the sweep (and reads directions) on every item in both option orders;
    `balance_format` projects the answer-letter and Yes/No axes out of the directions. With `backend`
    the sweep runs as a plan of per-layer jobs on it (local or Ray actors).
    """
    grid = check_alphas(alphas)
    source_kind: DirectionsFrom = check_directions_from(directions_from)
    subset = validate_heads(lm, heads) if heads is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    run = sweep_split(
        lm,
        items,
        grid,
        SweepPlan(n_sweep, seed, subset, balance_letters),
        # directions are captured in batches of 8 here, as before `fit_hsi` and this shared the sweep
        DirectionSource(
            source_kind, completions, n_samples, temperature=0.8, batch_size=8, balance_format=balance_format
        ),
        prompt=prompt,
        batch_size=batch_size,
        run_dir=run_dir,
        progress=progress,
        backend=backend,
    )
    if run_dir is not None:
        scores = run.sweep.head_scores(rank_by, model_name=lm.name, model_fingerprint=lm.fingerprint)
        scores.save(run_dir / HEAD_SCORES_DIR)
    return run
