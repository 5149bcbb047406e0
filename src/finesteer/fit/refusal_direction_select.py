"""Choosing the refusal direction on validation prompts, as Arditi et al. (2024) do, with the cheap proxy.

Every (post-instruction position, layer) gives a candidate r = mean(harmful) − mean(harmless). Each is
scored on held-out validation prompts with the first-token refusal log-odds
(`finesteer.locate.refusal_proxy`):

- bypass: mean refusal log-odds on harmful prompts with r ablated at every layer (lower = better);
- induce: mean refusal log-odds on harmless prompts with r added at its layer (should rise above 0);
- KL: mean next-token KL(p_base ‖ p_ablated) on harmless prompts (should stay below `kl_max`).

Layers at or beyond `max_layer_fraction` of the depth are skipped (Arditi: directions read too late
only restate the output). The bypass score is computed for every candidate; induce and KL, which
each need another pass, only for the `shortlist` best by bypass. The chosen direction is the best
bypass among those that pass both filters, or the best bypass overall when none does (then
`metadata["filters_passed"]` is False, so a reader sees the choice was unfiltered).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesteer.errors import check_count
from finesteer.fit.refusal_direction import (
    RUN_SUBFOLDER,
    RefusalDirection,
    RefusalDirectionError,
    directional_ablation,
    mean_differences,
    post_instruction_count,
)
from finesteer.interventions.edit import Intervention
from finesteer.locate.engine import encode_prompts
from finesteer.locate.refusal_proxy import base_last_logits, harmless_kl, refusal_scores
from finesteer.models.loading import LoadedModel
from finesteer.runs import RESULT_JSON, write_json_atomic

DIRECTION_DIR = RUN_SUBFOLDER


@dataclass(frozen=True)
class SelectionSettings:
    """How candidates are generated and filtered (Arditi's defaults: KL ≤ 0.1, layers < 0.8·depth)."""

    n_positions: int | None = None
    max_layer_fraction: float = 0.8
    kl_max: float = 0.1
    shortlist: int = 8
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.n_positions is not None:
            check_count(self.n_positions, "n_positions")
        check_count(self.shortlist, "shortlist")
        check_count(self.batch_size, "batch_size")
        if not 0 < self.max_layer_fraction <= 1:
            raise RefusalDirectionError(
                f"max_layer_fraction must be in (0, 1], got {self.max_layer_fraction}"
            )
        if not self.kl_max > 0:
            raise RefusalDirectionError(f"kl_max must be > 0, got {self.kl_max}")


def candidate_layers(n_layers: int, max_layer_fraction: float) -> list[int]:
    """Layers whose input may hold the direction: 0 … ⌈fraction·depth⌉ − 1 (at least layer 0)."""
    return list(range(max(1, int(max_layer_fraction * n_layers + 0.999999))))[:n_layers]


def select_direction(
    lm: LoadedModel,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    settings: SelectionSettings = SelectionSettings(),
    *,
    progress: bool = False,
) -> tuple[RefusalDirection, list[dict[str, Any]]]:
    """Fit every candidate on the train prompts, choose one on the val prompts (all formatted).

    Returns the chosen direction and one row per candidate (position, layer, bypass, and for the
    shortlist induce, kl, passes), best bypass first.
    """
    if not harmful_val or not harmless_val:
        raise RefusalDirectionError("need harmful and harmless validation prompts to choose a direction")
    started = time.perf_counter()
    n_pos = settings.n_positions or post_instruction_count(lm.tokenizer)
    diffs = mean_differences(lm, harmful_train, harmless_train, n_pos, batch_size=settings.batch_size)
    n_layers, batch = lm.info.n_layers, settings.batch_size
    layers = candidate_layers(n_layers, settings.max_layer_fraction)
    # at layer 0 the template's own tokens have equal embeddings in both classes: r = 0 there
    pairs = [(k, layer) for k in range(n_pos) for layer in layers if float(diffs[k, layer].norm()) > 1e-6]
    if not pairs:
        raise RefusalDirectionError("every candidate direction is zero: the two prompt sets do not differ")
    harmful, harmless = encode_prompts(lm, harmful_val), encode_prompts(lm, harmless_val)
    ablations = [directional_ablation(diffs[k, layer], n_layers) for k, layer in pairs]
    bypass = refusal_scores(lm, harmful, ablations, batch_size=batch, progress=progress, desc="bypass")
    bypass = bypass.mean(1)
    rows = [
        {"position": -1 - k, "layer": layer, "bypass": float(b)}
        for (k, layer), b in zip(pairs, bypass, strict=True)
    ]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["bypass"], i))
    short = order[: settings.shortlist]
    base_logits = base_last_logits(lm, harmless, batch_size=batch)
    kl = harmless_kl(lm, harmless, [ablations[i] for i in short], base_logits, batch_size=batch).mean(1)
    additions = [_direction(diffs, pairs[i]).addition() for i in short]
    induce = refusal_scores(lm, harmless, additions, batch_size=batch, desc="induce").mean(1)
    for i, kl_i, induce_i in zip(short, kl.tolist(), induce.tolist(), strict=True):
        passes = induce_i > 0 and kl_i <= settings.kl_max
        rows[i].update(induce=induce_i, kl=kl_i, passes=passes)
    passing = [i for i in short if rows[i]["passes"]]
    chosen = passing[0] if passing else short[0]
    base = refusal_scores(lm, harmful, [Intervention()], batch_size=batch)
    meta = {
        "filters_passed": bool(passing),
        "n_positions": n_pos,
        "bypass": rows[chosen]["bypass"],
        "induce": rows[chosen]["induce"],
        "kl": rows[chosen]["kl"],
        "base_refusal_harmful_val": float(base.mean()),
        "n_train": [len(harmful_train), len(harmless_train)],
        "n_val": [len(harmful_val), len(harmless_val)],
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "seconds": round(time.perf_counter() - started, 1),
    }
    direction = _direction(diffs, pairs[chosen], meta)
    return direction, [rows[i] for i in order]


def save_selection(
    folder: str | Path,
    lm: LoadedModel,
    direction: RefusalDirection,
    table: list[dict[str, Any]],
    info: dict[str, Any],
) -> dict[str, Any]:
    """Write `direction/` (the artifact) and `result.json` (the choice and every candidate's scores)."""
    folder = Path(folder)
    artifact = direction.save(folder / DIRECTION_DIR, lm)
    payload = {
        **info,
        "artifact": str(artifact),
        "layer": direction.layer,
        "position": direction.position,
        "norm": float(direction.vector.norm()),
        **direction.metadata,
        "candidates": table,
    }
    write_json_atomic(folder / RESULT_JSON, payload, indent=1)
    return payload


def _direction(diffs: Any, pair: tuple[int, int], meta: dict[str, Any] | None = None) -> RefusalDirection:
    k, layer = pair
    return RefusalDirection(diffs[k, layer], layer, -1 - k, meta or {})


__all__ = ["DIRECTION_DIR", "SelectionSettings", "candidate_layers", "save_selection", "select_direction"]
