"""Fit the ITI baseline on the same A/B data and budget as HSI.

Per-head logistic probes are trained on the train items' activations (both answers of each item)
and ranked by accuracy on the val items' activations; the top-k heads are steered along the
mass-mean direction of train ∪ val (ITI's `use_center_of_mass`) by α·σ, with σ the unbiased std of
the projections (ITI's current code). The number of heads (≤ k) and α are chosen on the val items
with HSI's letter-balanced criterion, so the two differ only in how heads are ranked.

By default every item is used in both option orders (`balance_letters`: probes cannot rank heads by
answer letter, and the choice is letter-balanced), each candidate is scored beside random-head
controls (`control_seeds`, for the selection's verdict) and the chosen heads' direction diagnostics
are recorded; `balance_format` projects the answer-letter and Yes/No axes out of the directions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finesteer.activations.diagnostics import format_axes
from finesteer.activations.directions import ab_contrast_inputs, capture_heads, directions_from_activations
from finesteer.data.balance import contrast_row_factors, letter_balanced
from finesteer.data.items import ABItem
from finesteer.errors import FinesteerError
from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.head_evidence import head_diagnostics, random_head_builder
from finesteer.fit.steering import Steering
from finesteer.locate.hsi_table import check_alphas
from finesteer.locate.iti import ProbeScores, train_probes
from finesteer.locate.selection import Criterion, Selection, select_prefix_and_alpha
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import ABPrompt


class ITIError(FinesteerError, ValueError):
    """An ITI fit that cannot run (no train or no val items)."""


DEFAULT_ITI_ALPHAS: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
"""α grid in units of σ (ITI's default is 15 with K=48 heads on Llama-2-7B)."""
PROBE_SCORES_DIR = "head_scores"
"""`fit_iti(run_dir=…)` writes the probe val accuracy of every head here (a `HeadScores` folder)."""
SELECTION_FILE = "selection.json"
"""… and the fitted metadata (chosen heads, α, the ranked top-k heads) here."""


def probe_items(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    *,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[ProbeScores, torch.Tensor, torch.Tensor]:
    """Probe accuracies plus the pooled activations [N, L, H, D] and labels of train ∪ val."""
    if not train_items or not val_items:
        raise ITIError("ITI needs both train and val items (probes are ranked on val accuracy)")
    train_inputs, train_y = ab_contrast_inputs(lm.tokenizer, train_items, system=system, prefill=prefill)
    val_inputs, val_y = ab_contrast_inputs(lm.tokenizer, val_items, system=system, prefill=prefill)
    z = capture_heads(lm, train_inputs + val_inputs, batch_size=batch_size, progress=progress)
    n_train = len(train_inputs)
    probes = train_probes(z[:n_train], train_y, z[n_train:], val_y, seed=seed, progress=progress)
    return probes, z, torch.tensor(train_y + val_y)


def fit_iti(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    **settings: Any,
) -> Steering:
    """`fit_iti_selection`'s steering (same keywords; `finesteer.methods.iti` also gives the verdict)."""
    return fit_iti_selection(lm, train_items, val_items, **settings)[0]


def fit_iti_selection(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    *,
    k: int = 4,
    alphas: Sequence[float] = DEFAULT_ITI_ALPHAS,
    run_dir: Path | None = None,
    progress: bool = True,
    system: str | None = None,
    prefill: str = "(",
    batch_size: int = 8,
    max_rows: int = 128,
    seed: int = 0,
    search_k: bool = True,
    balance_letters: bool = True,
    balance_format: bool = False,
    criterion: Criterion = "letter",
    control_seeds: Sequence[int] = CONTROL_SEEDS,
) -> tuple[Steering, Selection]:
    """ITI: top heads by probe val accuracy, mass-mean directions, head count (≤ k) and α chosen on val.

    The head count and α are chosen exactly as for HSI (letter-balanced val matching rate over the
    top-1 … top-k prefixes × α), so the two methods differ only in how heads are ranked. With
    `run_dir`, the probe table and the metadata are written there, and
    `finesteer.report.probes.plot_probe_accuracy_folder` draws the heatmap from them (fitting never plots).
    """
    grid = check_alphas(alphas)
    started = time.perf_counter()
    if balance_letters:
        train_items = letter_balanced(train_items, strict=False)
        val_items = letter_balanced(val_items, strict=False)
    probes, z, labels = probe_items(
        lm,
        train_items,
        val_items,
        system=system,
        prefill=prefill,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    remove = None
    if balance_format:
        letters, polarities = contrast_row_factors([*train_items, *val_items])
        remove = format_axes(z, labels, letters, polarities)
    directions = directions_from_activations(z, labels, ddof=1, remove=remove)
    ranked = probes.top_heads(k)
    selection = select_prefix_and_alpha(
        lm,
        ranked,
        directions,
        val_items,
        grid,
        k=k,
        search_k=search_k,
        prompt=ABPrompt(system, prefill),
        batch_size=batch_size,
        max_rows=max_rows,
        criterion=criterion,
        control=random_head_builder(directions, ranked) if control_seeds else None,
        control_seeds=control_seeds,
    )
    heads, alpha = selection.heads, selection.alpha
    metadata: dict[str, Any] = {
        "heads": [[layer, h] for layer, h in heads],
        "alpha": alpha,
        "alpha_units": "sigma",
        "scope": "last",
        "sigma": directions.summary(heads),
        "probe_val_accuracy": [float(probes.val_accuracy[layer, h]) for layer, h in heads],
        "probe_train_accuracy": [float(probes.train_accuracy[layer, h]) for layer, h in heads],
        "selection": selection.to_dict(),
        "ranked_heads": [[layer, h] for layer, h in ranked],
        "n_train_items": len(train_items),
        "n_val_items": len(val_items),
        "system": system,
        "prefill": prefill,
        "sigma_ddof": 1,
        "balance_letters": balance_letters,
        "balance_format": balance_format,
        "direction_diagnostics": head_diagnostics(directions, heads, "ITI"),
        "seconds": {"total": round(time.perf_counter() - started, 1)},
    }
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        table = probes.head_scores(model_name=lm.name, model_fingerprint=lm.fingerprint, n_prompts=len(z))
        table.save(run_dir / PROBE_SCORES_DIR)
        (run_dir / SELECTION_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return Steering("iti", intervention=directions.intervention(heads, alpha), metadata=metadata), selection
