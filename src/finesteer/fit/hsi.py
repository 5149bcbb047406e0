"""Fit HSI end to end: directions → single-head sweep → top heads and shared α on validation.

`fit_hsi(lm, train_items, val_items, HSIConfig(...))` is what the comparison harness and
`finesteer fit hsi` call. The training items are split
deterministically: `n_sweep` of them (balanced by matching letter) are held out for the head sweep,
the rest give the directions (so heads are ranked on items the directions never saw); the
validation items choose how many of the top heads (≤ k) to steer and the shared α.

α is in units of σ (the head's spread along v̂), as in the paper. The paper used α = 25–150 on
Llama-2-7B with directions read at the EOS after sampled answers. On SmolLM2-135M with A/B-letter
directions, single heads move p(matching) more and more up to α ≈ 16–32 and several heads together
saturate around α ≈ 16 (docs/results/hsi_smollm2.md), hence the default grid 4–32.

Fitting draws nothing: heatmaps of the sweep are `finesteer.report.sweep.plot_sweep`'s job.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from finesteer.activations.directions import LabelledCompletion
from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.head_evidence import head_diagnostics, random_head_builder
from finesteer.fit.hsi_directions import DIRECTIONS_FROM, DirectionsFrom, items_hash
from finesteer.fit.hsi_sweep import (
    DirectionSource,
    HeadSweep,
    HSIConfigError,
    SweepPlan,
    split_items,
    sweep_split,
    validate_heads,
)
from finesteer.fit.steering import Steering
from finesteer.locate.hsi import select_heads
from finesteer.locate.hsi_table import RANK_BY, RankBy, check_alphas
from finesteer.locate.selection import Selection
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt
from finesteer.sites import Head

log = logging.getLogger(__name__)

DEFAULT_HSI_ALPHAS: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
"""α grid (units of σ) of the sweep and of the shared-α choice; see the module docstring."""


@dataclass(frozen=True)
class HSIConfig:
    """Every setting of `fit_hsi`, checked when made.

    k: at most this many top heads are steered together (`search_k`: also try fewer). alphas: the
    α grid (units of σ, one sign: negative steers away), swept per head and searched for the shared
    α. heads_subset: sweep only these (layer, head) pairs. n_sweep: training items held out to rank
    heads on. rank_by: "balanced" (the worst letter group's gain), "max" or "mean". prompt: the A/B
    prompt format. batch_size / max_rows: prompts per prefix batch / rows per cached forward. seed:
    the held-out split. balance_letters: score every item in both option orders. directions_from,
    n_samples, sample_temperature: where directions come from (see `fit_hsi`). balance_format:
    project the answer-letter and Yes/No axes out of the directions. control_seeds: seeds of the
    random-head control scored beside every candidate of the selection (empty: none).
    rank_by "polarity" ranks heads and chooses among candidates by the worst letter × polarity group.
    """

    k: int = 4
    alphas: tuple[float, ...] = DEFAULT_HSI_ALPHAS
    heads_subset: tuple[Head, ...] | None = None
    n_sweep: int = 24
    rank_by: RankBy = "balanced"
    search_k: bool = True
    prompt: ABPrompt = DEFAULT_PROMPT
    batch_size: int = 8
    max_rows: int = 128
    seed: int = 0
    balance_letters: bool = True
    directions_from: DirectionsFrom = "ab"
    n_samples: int = 2
    sample_temperature: float = 0.8
    balance_format: bool = False
    control_seeds: tuple[int, ...] = CONTROL_SEEDS

    def __post_init__(self) -> None:
        for name in ("k", "n_sweep", "batch_size", "max_rows", "n_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HSIConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        try:
            object.__setattr__(self, "alphas", check_alphas(self.alphas))
        except ValueError as exc:
            raise HSIConfigError(str(exc)) from exc
        if self.heads_subset is not None:
            heads = tuple((int(layer), int(head)) for layer, head in self.heads_subset)
            if not heads:
                raise HSIConfigError("empty head subset")
            object.__setattr__(self, "heads_subset", heads)
        if self.rank_by not in RANK_BY:
            raise HSIConfigError(f"rank_by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if self.directions_from not in DIRECTIONS_FROM:
            raise HSIConfigError(
                f"directions_from must be one of {', '.join(DIRECTIONS_FROM)}, got {self.directions_from!r}"
            )
        if not isinstance(self.prompt, ABPrompt):
            raise HSIConfigError(f"prompt must be an ABPrompt, got {type(self.prompt).__name__}")
        if not (math.isfinite(self.sample_temperature) and self.sample_temperature >= 0):
            raise HSIConfigError(f"sample_temperature must be a number ≥ 0, got {self.sample_temperature}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HSIConfigError(f"seed must be an integer, got {self.seed!r}")
        seeds = tuple(self.control_seeds)
        if len(set(seeds)) != len(seeds) or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds):
            raise HSIConfigError(f"control_seeds must be distinct integers, got {self.control_seeds!r}")
        object.__setattr__(self, "control_seeds", seeds)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> HSIConfig:
        """A config from plain settings (a recipe, a comparison's method settings): the field names,
        with `system` / `prefill` for the prompt; an unknown name raises `HSIConfigError`."""
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in settings.items() if key not in ("system", "prefill")}
        unknown = sorted(set(values) - names)
        if unknown:
            accepted = ", ".join(sorted(names | {"system", "prefill"}))
            raise HSIConfigError(f"HSI does not take setting(s) {unknown}; it accepts {accepted}")
        if "system" in settings or "prefill" in settings:
            if "prompt" in values:
                raise HSIConfigError("give either prompt or system / prefill, not both")
            values["prompt"] = ABPrompt(settings.get("system"), settings.get("prefill", "("))
        for name in ("alphas", "control_seeds"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)


def _metadata(
    c: HSIConfig, run: HeadSweep, selection: Selection, val_items: Sequence[ABItem], total_seconds: float
) -> dict[str, Any]:
    """What `fit_hsi` records about a fit (the Steering's metadata and `selection.json`)."""
    return {
        "heads": [[layer, h] for layer, h in selection.heads],
        "alpha": selection.alpha,
        "alpha_units": "sigma",
        "scope": "last",
        "sigma": run.directions.summary(selection.heads),
        "selection": selection.to_dict(),
        "sweep": run.sweep.summary(
            top=max(10, c.k), rank_by=c.rank_by, diagnostics=run.directions.diagnostics
        ),
        "direction_diagnostics": head_diagnostics(run.directions, selection.heads),
        "balance_format": c.balance_format,
        "rank_by": c.rank_by,
        "balance_letters": c.balance_letters,
        "n_direction_items": run.n_direction_items,
        "n_sweep_items": run.n_sweep_items,
        "n_val_items": len(val_items),
        "direction_items_hash": run.direction_items_hash,
        "val_items_hash": items_hash(val_items),
        "system": c.prompt.system,
        "prefill": c.prompt.prefill,
        "position": "last token of prompt + answer",
        **run.source,
        "final_check": None,  # filled by `finesteer.methods.hsi.fit_hsi_checked` (it generates)
        "seconds": {
            "directions": round(run.seconds["directions"], 1),
            "sweep": round(run.seconds["sweep"], 1),
            "total": round(total_seconds, 1),
        },
    }


def fit_hsi(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    config: HSIConfig = HSIConfig(),
    *,
    completions: Sequence[LabelledCompletion] = (),
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> Steering:
    """`fit_hsi_selection`'s steering (see there)."""
    return fit_hsi_selection(
        lm, train_items, val_items, config, completions=completions, run_dir=run_dir, progress=progress
    )[0]


def fit_hsi_selection(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    config: HSIConfig = HSIConfig(),
    *,
    completions: Sequence[LabelledCompletion] = (),
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Steering, Selection]:
    """HSI: steer the k heads most sensitive to their behaviour direction, with one shared α.

    Directions come from `train_items` minus `config.n_sweep` held-out items, on which every head (or
    `config.heads_subset`) is swept over `config.alphas`; the top-k heads are then steered together
    on `val_items` for each α and the best α kept (ties → smaller α). Negative alphas steer away
    from the behaviour. With `run_dir` the directions, sweep checkpoints, sweep table
    (`sweep.safetensors`), head scores and `selection.json` are written there and a rerun resumes;
    nothing is written without it. `balance_letters` scores the sweep and α choice on every item in
    both option orders (`finesteer.data.balance`), so an edit that only shifts the model's A/B
    letter bias cannot look like a behaviour change; directions then come from both orders as well.

    `directions_from` says what the directions are read from: "ab" (both answer letters pasted
    after each prompt), "sampled" (the model's own replies to the HSI-format prompt, `n_samples`
    per item at `sample_temperature`, labelled by the option they name, read at the end-of-turn
    token: the paper's recipe), "both", or "given" (only `completions`). `completions` (formatted
    prompt, reply, label) are added in every case.

    Fitting does not generate: the generated-answer final check is `finesteer.methods.hsi.fit_hsi_checked`.
    The selection comes back too, with every candidate's per-item validation scores and those of its
    random-head control (`control_seeds`), for `finesteer.methods.verdict`.
    """
    if not isinstance(config, HSIConfig):
        raise HSIConfigError(f"config must be an HSIConfig, got {type(config).__name__}")
    if not val_items:
        raise HSIConfigError("fit_hsi needs validation items to choose α")
    c = config
    subset = validate_heads(lm, c.heads_subset) if c.heads_subset is not None else None
    started = time.perf_counter()
    folder = Path(run_dir) if run_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if c.balance_letters:
        val_items = letter_balanced(val_items, strict=False)
    run = sweep_split(
        lm,
        train_items,
        c.alphas,
        SweepPlan(c.n_sweep, c.seed, subset, c.balance_letters, c.max_rows),
        DirectionSource(
            c.directions_from, completions, c.n_samples, c.sample_temperature, c.batch_size, c.balance_format
        ),
        prompt=c.prompt,
        batch_size=c.batch_size,
        run_dir=folder,
        progress=progress,
    )
    sweep, directions = run.sweep, run.directions
    ranked = [(layer, head) for layer, head, _ in sweep.ranked_heads(c.rank_by)[: c.k]]
    selection = select_heads(
        lm,
        sweep,
        val_items,
        directions,
        k=c.k,
        alphas=c.alphas,
        rank_by=c.rank_by,
        search_k=c.search_k,
        prompt=c.prompt,
        batch_size=c.batch_size,
        max_rows=c.max_rows,
        control=random_head_builder(directions, ranked) if c.control_seeds else None,
        control_seeds=c.control_seeds,
    )
    intervention = directions.intervention(selection.heads, selection.alpha, scope="last")
    metadata = _metadata(c, run, selection, val_items, time.perf_counter() - started)
    if folder is not None:
        scores = sweep.head_scores(c.rank_by, model_name=lm.name, model_fingerprint=lm.fingerprint)
        scores.save(folder / "head_scores")
        (folder / "selection.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return Steering("hsi", intervention, metadata), selection


__all__ = [
    "DEFAULT_HSI_ALPHAS",
    "DirectionSource",
    "HSIConfig",
    "HSIConfigError",
    "HeadSweep",
    "SweepPlan",
    "fit_hsi",
    "fit_hsi_selection",
    "split_items",
    "sweep_split",
    "validate_heads",
]
