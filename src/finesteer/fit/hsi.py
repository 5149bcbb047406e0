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
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from finesteer.activations.directions import HeadDirections, LabelledCompletion
from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.fit.hsi_directions import DIRECTIONS_FROM, DirectionsFrom, hsi_directions, items_hash
from finesteer.fit.steering import Steering
from finesteer.locate.hsi import select_heads, sweep_heads
from finesteer.locate.hsi_table import RANK_BY, HsiSweep, RankBy, check_alphas
from finesteer.locate.selection import Selection
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt
from finesteer.sites import Head, check_heads

log = logging.getLogger(__name__)

DEFAULT_HSI_ALPHAS: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
"""α grid (units of σ) of the sweep and of the shared-α choice; see the module docstring."""


class HSIConfigError(FinesteerError, ValueError):
    """HSI settings that cannot work (k < 1, an unknown rank or directions source, a bad α grid)."""


@dataclass(frozen=True)
class HSIConfig:
    """Every setting of `fit_hsi`, checked when made.

    k: at most this many top heads are steered together (`search_k`: also try fewer). alphas: the
    α grid (units of σ, one sign: negative steers away), swept per head and searched for the shared
    α. heads_subset: sweep only these (layer, head) pairs. n_sweep: training items held out to rank
    heads on. rank_by: "balanced" (the worst letter group's gain), "max" or "mean". prompt: the A/B
    prompt format. batch_size / max_rows: prompts per prefix batch / rows per cached forward. seed:
    the held-out split. balance_letters: score every item in both option orders. directions_from,
    n_samples, sample_temperature: where directions come from (see `fit_hsi`).
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
        if isinstance(values.get("alphas"), list):
            values["alphas"] = tuple(values["alphas"])
        return cls(**values)


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
        "sweep": run.sweep.summary(top=max(10, c.k), rank_by=c.rank_by),
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
        DirectionSource(c.directions_from, completions, c.n_samples, c.sample_temperature, c.batch_size),
        prompt=c.prompt,
        batch_size=c.batch_size,
        run_dir=folder,
        progress=progress,
    )
    sweep, directions = run.sweep, run.directions
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
    )
    intervention = directions.intervention(selection.heads, selection.alpha, scope="last")
    metadata = _metadata(c, run, selection, val_items, time.perf_counter() - started)
    if folder is not None:
        scores = sweep.head_scores(c.rank_by, model_name=lm.name, model_fingerprint=lm.fingerprint)
        scores.save(folder / "head_scores")
        (folder / "selection.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return Steering("hsi", intervention, metadata)


__all__ = [
    "DEFAULT_HSI_ALPHAS",
    "DirectionSource",
    "HSIConfig",
    "HSIConfigError",
    "HeadSweep",
    "SweepPlan",
    "fit_hsi",
    "split_items",
    "sweep_split",
    "validate_heads",
]
