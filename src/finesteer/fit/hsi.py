"""Fit HSI end to end: directions → single-head sweep → top heads and shared α on validation.

`fit_hsi` is what the comparison harness and `finesteer fit hsi` call. The training items are split
deterministically: `n_sweep` of them (balanced by matching letter) are held out for the head sweep,
the rest give the directions (so heads are ranked on items the directions never saw); the
validation items choose how many of the top heads (≤ k) to steer and the shared α.

α is in units of σ (the head's spread along v̂), as in the paper. The paper used α = 25–150 on
Llama-2-7B with directions read at the EOS after sampled answers. On SmolLM2-135M with A/B-letter
directions, single heads move p(matching) more and more up to α ≈ 16–32 and several heads together
saturate around α ≈ 16 (docs/results/hsi_smollm2.md), hence the default grid 4–32.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from finesteer.capture.directions import HeadDirections, LabelledCompletion, fit_head_directions
from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.fit import FittedIntervention
from finesteer.fit.completions import (
    DEFAULT_SAMPLING,
    CompletionError,
    CompletionSet,
    check_both_classes,
    sample_labelled_completions,
)
from finesteer.interventions.edit import Intervention
from finesteer.locate.hsi import RankBy, check_alphas, plot_sweep, select_heads, sweep_heads
from finesteer.locate.scores import hash_prompts
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, check_heads

log = logging.getLogger(__name__)

DEFAULT_HSI_ALPHAS: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
"""α grid (units of σ) of the sweep and of the shared-α choice; see the module docstring."""
DIRECTIONS_FILE = "directions.safetensors"
SAMPLED_FILE = "sampled_answers.jsonl"
DirectionsFrom = Literal["ab", "sampled", "both", "given"]
DIRECTIONS_FROM: tuple[str, ...] = ("ab", "sampled", "both", "given")


def split_items(items: Sequence[ABItem], n_held_out: int, seed: int = 0) -> tuple[list[ABItem], list[ABItem]]:
    """(rest, held_out): `n_held_out` items (at most half) set aside, balanced by matching letter.

    Each letter's items are shuffled with `seed` and dealt round-robin, so a held-out set has as
    many "(A)"- as "(B)"-matching items as possible (a letter-preference shift then cannot pass
    for a behaviour change); the order of `rest` follows the input.
    """
    if len(items) < 2:
        raise ValueError(f"need at least 2 training items to split, got {len(items)}")
    n = max(1, min(n_held_out, len(items) // 2))
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
        raise ValueError("empty head subset")
    return checked


def items_hash(items: Iterable[ABItem]) -> str:
    return hash_prompts(f"{i.id}\x00{i.question}\x00{i.matching}" for i in items)[:16]


def completions_hash(completions: Iterable[LabelledCompletion]) -> str:
    return hash_prompts(f"{p}\x00{c}\x00{int(label)}" for p, c, label in completions)[:16]


def cached_directions(
    lm: LoadedModel,
    items: Sequence[ABItem],
    run_dir: Path | None,
    *,
    system: str | None,
    prefill: str,
    completions: Sequence[LabelledCompletion] = (),
    ddof: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> HeadDirections:
    """Directions, reused from `run_dir` when they were fitted on the same model, data and format."""
    parts: list[Any] = [lm.name, lm.fingerprint, items_hash(items), system, prefill, ddof]
    if completions:
        parts.append(completions_hash(completions))
    key = json.dumps(parts)
    stamp = run_dir / (DIRECTIONS_FILE + ".key") if run_dir else None
    path = run_dir / DIRECTIONS_FILE if run_dir else None
    if path is not None and stamp is not None and stamp.is_file() and stamp.read_text() == key:
        return HeadDirections.load(path)
    directions = fit_head_directions(
        lm,
        items,
        completions=completions,
        system=system,
        prefill=prefill,
        ddof=ddof,
        batch_size=batch_size,
        progress=progress,
    )
    if path is not None and stamp is not None:
        directions.save(path)
        stamp.write_text(key)
    return directions


def check_directions_from(value: str) -> DirectionsFrom:
    """`value` if it names a directions source, else a ValueError listing the sources."""
    if value not in DIRECTIONS_FROM:
        raise ValueError(f"directions_from must be one of {', '.join(DIRECTIONS_FROM)}, got {value!r}")
    return value  # type: ignore[return-value]


def direction_completions(
    lm: LoadedModel,
    items: Sequence[ABItem],
    directions_from: DirectionsFrom,
    given: Sequence[LabelledCompletion] = (),
    *,
    run_dir: Path | None = None,
    n_samples: int = 2,
    temperature: float = 0.8,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[LabelledCompletion], dict[str, Any] | None]:
    """The labelled completions directions are read from, plus sampling stats (None if nothing sampled).

    Sampled answers are saved in `run_dir` and reused by a rerun with the same items and settings.
    """
    check_directions_from(directions_from)
    labelled = list(given)
    if directions_from == "given" and not labelled:
        raise CompletionError("directions_from='given' needs labelled completions")
    if directions_from not in ("sampled", "both"):
        return labelled, None
    config = replace(DEFAULT_SAMPLING, temperature=temperature, batch_size=max(batch_size, 1))
    key = json.dumps([lm.name, lm.fingerprint, items_hash(items), system, n_samples, repr(config)])
    path = run_dir / SAMPLED_FILE if run_dir is not None else None
    stamp = run_dir / (SAMPLED_FILE + ".key") if run_dir is not None else None
    if path is not None and stamp is not None and stamp.is_file() and stamp.read_text() == key:
        answers = CompletionSet.load(path)
    else:
        answers = sample_labelled_completions(
            lm, items, n_samples=n_samples, config=config, system=system, progress=progress
        )
        if path is not None and stamp is not None:
            answers.save(path)
            stamp.write_text(key)
    sampled = answers.labelled()
    check_both_classes(sampled, f"{len(answers.answers)} sampled answers")
    stats = answers.stats()
    log.info(
        "HSI directions from sampled answers: %d of %d named one option (%d matching, %d not)",
        stats["n_defined"],
        stats["n_sampled"],
        stats["n_matching"],
        stats["n_not_matching"],
    )
    return labelled + sampled, stats


def hsi_directions(
    lm: LoadedModel,
    items: Sequence[ABItem],
    run_dir: Path | None,
    *,
    directions_from: DirectionsFrom = "ab",
    completions: Sequence[LabelledCompletion] = (),
    n_samples: int = 2,
    temperature: float = 0.8,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[HeadDirections, dict[str, Any]]:
    """HSI's directions from `items` as `directions_from` says, plus a record of where they came from."""
    labelled, sampled = direction_completions(
        lm,
        items,
        directions_from,
        completions,
        run_dir=run_dir,
        n_samples=n_samples,
        temperature=temperature,
        system=system,
        batch_size=batch_size,
        progress=progress,
    )
    directions = cached_directions(
        lm,
        items if directions_from in ("ab", "both") else [],
        run_dir,
        completions=labelled,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        progress=progress,
    )
    return directions, {
        "directions_from": directions_from,
        "n_completions": len(labelled),
        "sampled": sampled,
    }


def generation_check(
    lm: LoadedModel,
    items: Sequence[ABItem],
    intervention: Intervention,
    max_new_tokens: int,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Generated-answer matching rate and undefined count on `items`, unmodified vs steered."""
    from finesteer.evaluate.ab import ab_matching_rate_generated
    from finesteer.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows: dict[str, Any] = {"n": len(items), "max_new_tokens": max_new_tokens}
    for name, edit in (("unmodified", None), ("steered", intervention)):
        result = ab_matching_rate_generated(
            lm, items, system=system, intervention=edit, config=config, progress=progress
        )
        rows[name] = {"matching_rate": result.matching_rate, "n_undefined": result.n_undefined}
    lost = rows["steered"]["n_undefined"] - rows["unmodified"]["n_undefined"]
    if lost > 0.25 * len(items):
        log.warning(
            "HSI final check: with the chosen edit %d more of %d validation replies name no option "
            "(%d vs %d); the edit breaks the answer format, consider a smaller α",
            lost,
            len(items),
            rows["steered"]["n_undefined"],
            rows["unmodified"]["n_undefined"],
        )
    return rows


def fit_hsi(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    *,
    k: int = 4,
    alphas: Sequence[float] = DEFAULT_HSI_ALPHAS,
    heads_subset: Iterable[Head] | None = None,
    run_dir: Path | None = None,
    progress: bool = True,
    n_sweep: int = 24,
    rank_by: RankBy = "balanced",
    search_k: bool = True,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    max_rows: int = 128,
    seed: int = 0,
    balance_letters: bool = True,
    directions_from: DirectionsFrom = "ab",
    completions: Sequence[LabelledCompletion] = (),
    n_samples: int = 2,
    sample_temperature: float = 0.8,
    final_check_tokens: int = 0,
) -> FittedIntervention:
    """HSI: steer the k heads most sensitive to their behaviour direction, with one shared α.

    Directions come from `train_items` minus `n_sweep` held-out items, on which every head (or
    `heads_subset`) is swept over `alphas`; the top-k heads are then steered together on
    `val_items` for each α and the best α kept (ties → smaller α). Negative `alphas` steer away
    from the behaviour. With `run_dir` the directions, sweep checkpoints and heatmaps are written
    there and a rerun resumes. `balance_letters` scores the sweep and α choice on every item in both
    option orders (`finesteer.data.balance`), so an edit that only shifts the model's A/B letter
    bias cannot look like a behaviour change; directions then come from both orders as well.

    `directions_from` says what the directions are read from: "ab" (both answer letters pasted
    after each prompt), "sampled" (the model's own replies to the HSI-format prompt, `n_samples`
    per item at `sample_temperature`, labelled by the option they name, read at the end-of-turn
    token: the paper's recipe), "both", or "given" (only `completions`). `completions` (formatted
    prompt, reply, label) are added in every case.

    `final_check_tokens` > 0 runs the issue's "generation-and-parse as the final check": the
    validation items are answered (HSI prompt, greedy, that many tokens) with and without the
    chosen edit, and the matching rate and count of replies naming no option go into the metadata;
    an edit that costs the answer format is logged as a warning.
    """
    if not val_items:
        raise ValueError("fit_hsi needs validation items to choose α")
    grid = check_alphas(alphas)
    subset = validate_heads(lm, heads_subset) if heads_subset is not None else None
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    direction_items, sweep_items = split_items(train_items, n_sweep, seed)
    if balance_letters:
        direction_items = letter_balanced(direction_items, strict=False)
        sweep_items = letter_balanced(sweep_items, strict=False)
        val_items = letter_balanced(val_items, strict=False)
    directions, source = hsi_directions(
        lm,
        direction_items,
        run_dir,
        directions_from=directions_from,
        completions=completions,
        n_samples=n_samples,
        temperature=sample_temperature,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        progress=progress,
    )
    t_directions = time.perf_counter() - started
    sweep = sweep_heads(
        lm,
        sweep_items,
        directions,
        grid,
        heads=subset,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        max_rows=max_rows,
        run_dir=run_dir,
        progress=progress,
    )
    t_sweep = time.perf_counter() - started - t_directions
    selection = select_heads(
        lm,
        sweep,
        val_items,
        directions,
        k=k,
        alphas=grid,
        rank_by=rank_by,
        search_k=search_k,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        max_rows=max_rows,
    )
    intervention = directions.intervention(selection.heads, selection.alpha, scope="last")
    final_check = (
        generation_check(lm, val_items, intervention, final_check_tokens, system, batch_size, progress)
        if final_check_tokens > 0
        else None
    )
    metadata: dict[str, Any] = {
        "heads": [[layer, h] for layer, h in selection.heads],
        "alpha": selection.alpha,
        "alpha_units": "sigma",
        "scope": "last",
        "sigma": directions.summary(selection.heads),
        "selection": selection.to_dict(),
        "sweep": sweep.summary(top=max(10, k), rank_by=rank_by),
        "rank_by": rank_by,
        "balance_letters": balance_letters,
        "n_direction_items": len(direction_items),
        "n_sweep_items": len(sweep_items),
        "n_val_items": len(val_items),
        "direction_items_hash": items_hash(direction_items),
        "val_items_hash": items_hash(val_items),
        "system": system,
        "prefill": prefill,
        "position": "last token of prompt + answer",
        **source,
        "final_check": final_check,
        "seconds": {
            "directions": round(t_directions, 1),
            "sweep": round(t_sweep, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    if run_dir is not None:
        scores = sweep.head_scores(rank_by, model_name=lm.name, model_fingerprint=lm.fingerprint)
        scores.save(run_dir / "head_scores")
        plot_sweep(sweep, run_dir, rank_by=rank_by, top=k)
        (run_dir / "selection.json").write_text(json.dumps(metadata, indent=1) + "\n")
    return FittedIntervention("hsi", intervention, metadata)
