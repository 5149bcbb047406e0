"""HSI's locate half: split the training items, read directions, sweep every head alone over an α grid.

`sweep_hsi_heads` is what `finesteer locate hsi` runs; it is the part of `fit_hsi` before the
top-k and α choice (directions from the training items minus `n_sweep` held-out items, on which
every head, or a subset, is steered alone with each α). With `run_dir` the directions, sampled
answers and per-layer sweep checkpoints are written there, a rerun resumes, and the head table is
saved to `run_dir/head_scores`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from finesteer.activations.directions import LabelledCompletion
from finesteer.data.items import ABItem
from finesteer.fit.hsi import DirectionSource, HeadSweep, SweepPlan, sweep_split, validate_heads
from finesteer.fit.hsi_directions import DirectionsFrom, check_directions_from
from finesteer.locate.hsi_table import RankBy, check_alphas
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt
from finesteer.sites import Head

HEAD_SCORES_DIR = "head_scores"


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
    backend: Backend | None = None,
) -> HeadSweep:
    """Directions from `items` minus `n_sweep` held-out items, then every head swept alone on those.

    `balance_letters` scores the sweep (and reads directions) on every item in both option orders.
    With `backend` the sweep runs as a plan of per-layer jobs on it (local or Ray actors).
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
        DirectionSource(source_kind, completions, n_samples, temperature=0.8, batch_size=8),
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
