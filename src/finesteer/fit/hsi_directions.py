"""Where HSI's head directions come from: answer letters, the model's own sampled answers, or given replies.

Directions and sampled answers are cached in a run folder, keyed by model, items and prompt format,
so a rerun reuses them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from finesteer.activations.directions import HeadDirections, LabelledCompletion, fit_head_directions
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.fit.completions import (
    DEFAULT_SAMPLING,
    CompletionError,
    CompletionSet,
    check_both_classes,
    sample_labelled_completions,
)
from finesteer.locate.scores import hash_prompts
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt


class DirectionsError(FinesteerError, ValueError):
    """An unknown source for the HSI directions (--directions-from)."""


log = logging.getLogger(__name__)

DIRECTIONS_FILE = "directions.safetensors"
SAMPLED_FILE = "sampled_answers.jsonl"
DirectionsFrom = Literal["ab", "sampled", "both", "given"]
DIRECTIONS_FROM: tuple[str, ...] = ("ab", "sampled", "both", "given")


def items_hash(items: Iterable[ABItem]) -> str:
    return hash_prompts(f"{i.id}\x00{i.question}\x00{i.matching}" for i in items)[:16]


def completions_hash(completions: Iterable[LabelledCompletion]) -> str:
    return hash_prompts(f"{p}\x00{c}\x00{int(label)}" for p, c, label in completions)[:16]


def cached_directions(
    lm: LoadedModel,
    items: Sequence[ABItem],
    run_dir: Path | None,
    *,
    prompt: ABPrompt = DEFAULT_PROMPT,
    completions: Sequence[LabelledCompletion] = (),
    ddof: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    balance_format: bool = False,
) -> HeadDirections:
    """Directions, reused from `run_dir` when they were fitted on the same model, data and format
    (`balance_format`: answer-letter and Yes/No axes projected out, see `fit_head_directions`)."""
    parts: list[Any] = [lm.name, lm.fingerprint, items_hash(items), prompt.system, prompt.prefill, ddof]
    if completions:
        parts.append(completions_hash(completions))
    if balance_format:
        parts.append("balance_format")
    key = json.dumps(parts)
    stamp = run_dir / (DIRECTIONS_FILE + ".key") if run_dir else None
    path = run_dir / DIRECTIONS_FILE if run_dir else None
    if path is not None and stamp is not None and stamp.is_file() and stamp.read_text() == key:
        return HeadDirections.load(path)
    directions = fit_head_directions(
        lm,
        items,
        completions=completions,
        system=prompt.system,
        prefill=prompt.prefill,
        ddof=ddof,
        batch_size=batch_size,
        progress=progress,
        balance_format=balance_format,
    )
    if path is not None and stamp is not None:
        directions.save(path)
        stamp.write_text(key)
    return directions


def check_directions_from(value: str) -> DirectionsFrom:
    """`value` if it names a directions source, else a ValueError listing the sources."""
    if value not in DIRECTIONS_FROM:
        raise DirectionsError(f"directions_from must be one of {', '.join(DIRECTIONS_FROM)}, got {value!r}")
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
    prompt: ABPrompt = DEFAULT_PROMPT,
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
    key = json.dumps([lm.name, lm.fingerprint, items_hash(items), prompt.system, n_samples, repr(config)])
    path = run_dir / SAMPLED_FILE if run_dir is not None else None
    stamp = run_dir / (SAMPLED_FILE + ".key") if run_dir is not None else None
    if path is not None and stamp is not None and stamp.is_file() and stamp.read_text() == key:
        answers = CompletionSet.load(path)
    else:
        answers = sample_labelled_completions(
            lm, items, n_samples=n_samples, config=config, system=prompt.system, progress=progress
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
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    progress: bool = False,
    balance_format: bool = False,
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
        prompt=prompt,
        batch_size=batch_size,
        progress=progress,
    )
    directions = cached_directions(
        lm,
        items if directions_from in ("ab", "both") else [],
        run_dir,
        completions=labelled,
        prompt=prompt,
        batch_size=batch_size,
        progress=progress,
        balance_format=balance_format,
    )
    return directions, {
        "directions_from": directions_from,
        "balance_format": balance_format,
        "n_completions": len(labelled),
        "sampled": sampled,
    }


__all__ = [
    "DIRECTIONS_FILE",
    "DIRECTIONS_FROM",
    "SAMPLED_FILE",
    "DirectionsFrom",
    "cached_directions",
    "check_directions_from",
    "completions_hash",
    "direction_completions",
    "hsi_directions",
    "items_hash",
]
