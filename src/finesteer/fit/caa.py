"""CAA (Rimsky et al., 2024): contrastive activation addition with one residual vector per layer.

Vector: for each A/B item, the decoder-layer output (`resid_post`) at the answer-letter token of
prompt + "(A" (behaviour-matching answer) minus the same at prompt + "(B" (not matching); the CAA
vector of layer L is the mean of these differences. It is *not* normalised (CAA adds the raw mean
difference with a multiplier); its norm is reported.

The letter is passed to `capture` as a separate completion, so the read position is exactly the
letter token even where the tokenizer would merge "(A" into one token (Qwen2.5 does), and it is the
same conditioning the letter-probability metric uses ("…(" → next token "A").

Application: `steer_residual(L, v, multiplier, scope="from_end:K")`, i.e. every position from the
end of the instruction (the last K prompt tokens, then every generated token), where K is the
number of tokens the chat template writes after the user's text *including* the pre-filled "(":
for ChatML (SmolLM2, Qwen2.5) that is `<|im_end|>`, "\\n", `<|im_start|>`, "assistant", "\\n", "(".
CAA on Llama-2 steered the tokens after "[/INST]" (just " (" and the answer); with ChatML the
closing/opening markers take the place of "[/INST]", so they are steered too. On a prompt without
the pre-fill (open-ended questions) the same K also covers the last token of the user's text.

Layer and multiplier are chosen on a validation split with the letter-probability metric. The sweep
uses a fast path that computes each prompt's unchanged prefix once and re-runs only the K steered
tail tokens per (layer, multiplier) (`finesteer.scoring.ab.ABScorer`, `reuse_prefix=K`); tests check
it equals the plain evaluation. Template-tail probing lives in `finesteer.fit.caa_tail`, the vectors
in `finesteer.fit.caa_vectors`.

By default the items are used in both option orders (`balance_letters`: the vector's letter
component cancels and the layer × multiplier choice is letter-balanced), and every candidate is
scored beside random directions of equal norm at the same layer and scope (`control_seeds`), which
`finesteer.methods.verdict` tests the choice against. `balance_format` projects the answer-letter
and Yes/No axes out of the vectors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from finesteer.data.balance import letter_balanced, matching_polarity
from finesteer.data.items import ABItem
from finesteer.fit.caa_tail import CAAError, caa_scope, instruction_tail_tokens, scored_tail_ids
from finesteer.fit.caa_vectors import CAAVectors, caa_vectors
from finesteer.fit.controls import CONTROL_SEEDS, random_direction_control
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import Intervention, steer_residual
from finesteer.locate.selection import SelectionEvidence
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, ABScorer, OptionScores

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
"""CAA's natural scale (1), the grid HSI's authors swept for their CAA baseline (1, 2, 5), and 0.5."""

Direction = Literal["towards", "away"]


def caa_intervention(vector: Tensor, layer: int, multiplier: float, k: int) -> Intervention:
    """The CAA edit: add multiplier·v to layer `layer`'s output from the end of the instruction."""
    return steer_residual(layer, vector, multiplier, scope=caa_scope(k))


# --- layer × multiplier sweep ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    layer: int
    multiplier: float
    mean_p_matching: float
    matching_rate: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "layer": self.layer,
            "multiplier": self.multiplier,
            "mean_p_matching": self.mean_p_matching,
            "matching_rate": self.matching_rate,
        }


def sweep_caa(
    lm: LoadedModel,
    vectors: CAAVectors,
    val_items: Sequence[ABItem],
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    *,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[OptionScores, list[SweepPoint]]:
    """Validation scores of the unsteered model (row 0) and of every (fitted layer, multiplier) (rows 1…),
    with the sweep points.

    Fast path: every scored sequence ends in the same K template-tail tokens (checked), so the prefix
    before them is run once per batch and only the tail is re-run per edit (`ABScorer` with
    `reuse_prefix=K`); equal to the full-forward evaluation of the `from_end:K` edits (tested).
    """
    mults = [float(m) for m in multipliers]
    if not mults or any(not math.isfinite(m) for m in mults):
        raise CAAError(f"multipliers must be a non-empty list of finite numbers, got {list(multipliers)}")
    if not val_items:
        raise CAAError("no validation items")
    tail = scored_tail_ids(lm.tokenizer, prompt)
    k = len(tail)
    scorer = ABScorer(lm, val_items, prompt, batch_size=batch_size)
    for target in scorer.targets:
        if len(target.tokens) <= k or list(target.tokens[-k:]) != tail:
            raise CAAError(
                f"item {target.id!r}: its scored prompt does not end with the {k} template-tail tokens; "
                "the prefix-cached sweep needs a fixed tail"
            )
    grid = [(layer, m) for layer in vectors.layers for m in mults]
    ivs: list[Intervention | None] = [None]
    ivs += [caa_intervention(vectors.vector(layer), layer, m, k) for layer, m in grid]
    scores = scorer.score(ivs, reuse_prefix=k, progress=progress)
    points = [
        SweepPoint(
            layer, m, float(scores.p_matching[row].mean()), float(scores.matching[row].double().mean())
        )
        for row, (layer, m) in enumerate(grid, start=1)
    ]
    return scores, points


def select_point(
    points: Sequence[SweepPoint],
    unsteered: float,
    direction: Direction = "towards",
    tolerance: float = 0.1,
) -> SweepPoint:
    """The sweep point to keep, by validation mean p(matching) (lowest for "away").

    Among the points whose gain over the `unsteered` score is at least (1 − `tolerance`) of the
    best gain, the smallest |multiplier| wins: when several settings saturate the A/B score, the
    gentlest (least damaging) one is kept. The tolerance is relative to the gain, so when every
    gain is small the best point is still the one chosen. No point improving → the best one.
    """
    if not points:
        raise CAAError("empty sweep")
    if direction not in ("towards", "away"):
        raise CAAError(f"direction must be 'towards' or 'away', got {direction!r}")
    if not 0 <= tolerance < 1:
        raise CAAError(f"tolerance must be in [0, 1), got {tolerance}")
    sign = 1.0 if direction == "towards" else -1.0
    gains = [sign * (p.mean_p_matching - unsteered) for p in points]
    best = max(gains)
    if best <= 0:
        return points[gains.index(best)]
    near = [p for p, gain in zip(points, gains, strict=True) if gain >= (1 - tolerance) * best]
    return min(near, key=lambda p: (abs(p.multiplier), -sign * p.mean_p_matching, p.layer))


# --- fit----------------------------------------------------------------------------------------------


def _reference_check(
    lm: LoadedModel,
    val_items: Sequence[ABItem],
    prompt: ABPrompt,
    batch_size: int,
    intervention: Intervention,
    chosen: SweepPoint,
) -> tuple[float, float]:
    """The chosen setting's (mean p(matching), matching rate) through the reference path (full
    forwards, no prefix reuse); warns if the sweep's fast path disagreed."""
    check = ABScorer(lm, val_items, prompt, batch_size=batch_size).score([intervention])
    check_p, check_rate = float(check.p_matching[0].mean()), int(check.matching[0].sum()) / len(val_items)
    if abs(check_p - chosen.mean_p_matching) > 1e-3:
        log.warning(
            "CAA sweep fast path and plain evaluation disagree: %.4f vs %.4f", chosen.mean_p_matching, check_p
        )
    return check_p, check_rate


def _save_sweep(
    folder: Path,
    vectors: CAAVectors,
    baseline: tuple[float, float],
    points: Sequence[SweepPoint],
    chosen: SweepPoint,
) -> None:
    """`caa_vectors.safetensors` and `caa_sweep.json` (baseline, every point, the chosen one)."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors.save(folder / "caa_vectors.safetensors")
    sweep = {"baseline": {"mean_p_matching": baseline[0], "matching_rate": baseline[1]}}
    sweep["points"] = [p.to_dict() for p in points]  # type: ignore[assignment]
    (folder / "caa_sweep.json").write_text(json.dumps({**sweep, "chosen": chosen.to_dict()}, indent=2) + "\n")


def _control_scores(
    lm: LoadedModel,
    val_items: Sequence[ABItem],
    candidates: Sequence[Intervention],
    seeds: Sequence[int],
    prompt: ABPrompt,
    batch_size: int,
    k: int,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-candidate random-direction controls (equal norm, same layer and scope), mean over seeds:
    p(matching) and matching [n_candidates, n_items]. As costly as the sweep × seeds, so it shows
    progress too."""
    controls = [random_direction_control(iv, seed) for iv in candidates for seed in seeds]
    scorer = ABScorer(lm, val_items, prompt, batch_size=batch_size)
    scores = scorer.score(controls, reuse_prefix=k, progress=progress)
    shape = (len(candidates), len(seeds), -1)
    return scores.p_matching.double().view(shape).mean(1), scores.matching.double().view(shape).mean(1)


def _layer_diagnostics(vectors: CAAVectors, layer: int) -> dict[str, Any]:
    if vectors.diagnostics is None:
        return {}
    index = vectors.layers.index(layer)
    warnings = vectors.diagnostics.warnings([(index,)], what="CAA layer", names=[str(layer)])
    for line in warnings:
        log.warning(line)
    return {"layer": layer, **vectors.diagnostics.at(index), "warnings": warnings}


def fit_caa(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    **settings: Any,
) -> Steering:
    """`fit_caa_selection`'s steering (same keywords; `finesteer.methods.caa` also gives the verdict)."""
    return fit_caa_selection(lm, train_items, val_items, **settings)[0]


def fit_caa_selection(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    *,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    direction: Direction = "towards",
    tolerance: float = 0.1,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    run_dir: str | Path | None = None,
    progress: bool = True,
    balance_letters: bool = True,
    balance_format: bool = False,
    control_seeds: Sequence[int] = CONTROL_SEEDS,
) -> tuple[Steering, SelectionEvidence]:
    """CAA vectors from `train_items`, layer × multiplier chosen on `val_items` (letter probability).

    `direction="away"` negates the multipliers and picks the lowest p(matching). Writes
    `caa_vectors.safetensors` and `caa_sweep.json` to `run_dir` when given. Also returns every
    candidate's per-item validation scores, with its random-direction controls (`control_seeds`).
    """
    if not train_items:
        raise CAAError("no training items for CAA")
    if not val_items:
        raise CAAError("no validation items for CAA's layer/multiplier sweep")
    if direction not in ("towards", "away"):
        raise CAAError(f"direction must be 'towards' or 'away', got {direction!r}")
    started = time.perf_counter()
    if balance_letters:
        train_items = letter_balanced(train_items, strict=False)
        val_items = letter_balanced(val_items, strict=False)
    k = instruction_tail_tokens(lm.tokenizer, prompt)
    vectors = caa_vectors(
        lm,
        train_items,
        layers=layers,
        prompt=prompt,
        batch_size=batch_size,
        progress=progress,
        balance_format=balance_format,
    )
    sign = 1.0 if direction == "towards" else -1.0
    mults = [sign * abs(float(m)) for m in multipliers]
    scores, points = sweep_caa(
        lm, vectors, val_items, mults, prompt=prompt, batch_size=batch_size, progress=progress
    )
    base_p, base_rate = float(scores.p_matching[0].mean()), float(scores.matching[0].double().mean())
    chosen = select_point(points, base_p, direction, tolerance)
    intervention = caa_intervention(vectors.vector(chosen.layer), chosen.layer, chosen.multiplier, k)
    norms = vectors.norms()
    check_p, check_rate = _reference_check(lm, val_items, prompt, batch_size, intervention, chosen)
    grid = [caa_intervention(vectors.vector(p.layer), p.layer, p.multiplier, k) for p in points]
    evidence = SelectionEvidence(
        labels=[f"layer {p.layer}, ×{p.multiplier:g}" for p in points],
        p_matching=scores.p_matching[1:].double(),
        matching=scores.matching[1:].double(),
        baseline_p=scores.p_matching[0].double(),
        baseline_matching=scores.matching[0].double(),
        item_ids=[item.id for item in val_items],
        polarities=[matching_polarity(item) for item in val_items],
        chosen_index=list(points).index(chosen),
        direction=int(sign),
    )
    if control_seeds:
        evidence.control_p, evidence.control_matching = _control_scores(
            lm, val_items, grid, control_seeds, prompt, batch_size, k, progress
        )
        evidence.control_seeds, evidence.control_kind = tuple(control_seeds), "random-direction"
    metadata: dict[str, Any] = {
        "method": "caa",
        "layer": chosen.layer,
        "multiplier": chosen.multiplier,
        "vector_norm": norms[chosen.layer],
        "scope": caa_scope(k),
        "template_tail_tokens": k,
        "direction": direction,
        "selection": (
            f"best val mean p(matching) ({direction}); smallest |multiplier| among points with ≥ "
            f"{1 - tolerance:.0%} of the best gain over unsteered"
        ),
        "val_mean_p_matching": check_p,
        "val_matching_rate": check_rate,
        "val_baseline_mean_p_matching": base_p,
        "val_baseline_matching_rate": base_rate,
        "balance_letters": balance_letters,
        "balance_format": balance_format,
        "direction_diagnostics": _layer_diagnostics(vectors, chosen.layer),
        "n_train": len(train_items),
        "n_val": len(val_items),
        "layers_swept": list(vectors.layers),
        "multipliers_swept": mults,
        "vector_norms": {str(layer): n for layer, n in norms.items()},
        "system_prompt": prompt.system,
        "prefill": prompt.prefill,
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    if run_dir is not None:
        _save_sweep(Path(run_dir), vectors, (base_p, base_rate), points, chosen)
    log.info(
        "CAA: layer %d, multiplier %g (|v| = %.3g): val p(matching) %.3f (unsteered %.3f)",
        chosen.layer,
        chosen.multiplier,
        norms[chosen.layer],
        chosen.mean_p_matching,
        base_p,
    )
    return Steering("caa", intervention, metadata), evidence


__all__ = [
    "DEFAULT_MULTIPLIERS",
    "Direction",
    "SweepPoint",
    "caa_intervention",
    "fit_caa",
    "fit_caa_selection",
    "select_point",
    "sweep_caa",
]
