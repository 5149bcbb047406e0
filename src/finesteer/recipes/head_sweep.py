"""`finesteer locate hsi|iti` as library calls: sweep or probe every head on an A/B `generate` split,
write the run folder, and say how much to believe the best head.

`locate_hsi` adds to the sweep table each top head's direction diagnostics (consistency of the
per-item differences, d′ and AUROC along the direction; a warning on stderr when low) and the
sweep's verdict (`finesteer.methods.verdict.sweep_verdict`: does the best head × α beat the
unmodified model, given every one tried?). Both commands use every item in both option orders by
default, so neither ranks heads by answer letter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from finesteer.activations.directions import LabelledCompletion
from finesteer.data.balance import letter_balanced
from finesteer.data.typed import load_ab_set
from finesteer.fit.hsi import split_items
from finesteer.fit.hsi_sweep import sweep_hsi_heads
from finesteer.fit.iti import probe_items
from finesteer.locate.hsi_table import RankBy
from finesteer.locate.run_folder import write_run
from finesteer.methods.verdict import say_verdict, sweep_verdict
from finesteer.models import load_model
from finesteer.models.loading import LoadedModel
from finesteer.recipes.fit_split import GENERATE_SPLIT
from finesteer.report.heatmap import plot_head_heatmap
from finesteer.report.sweep import plot_sweep
from finesteer.scoring.ab import ABPrompt
from finesteer.sites import Head

log = logging.getLogger(__name__)


def locate_hsi(
    model: str,
    data: str,
    alphas: Sequence[float],
    out: Path,
    *,
    limit: int | None = None,
    n_sweep: int = 24,
    heads: Sequence[Head] | None = None,
    system: str | None = None,
    batch_size: int = 8,
    rank_by: RankBy = "balanced",
    directions_from: str = "ab",
    completions: Sequence[LabelledCompletion] = (),
    n_samples: int = 2,
    seed: int = 0,
    balance_letters: bool = True,
    balance_format: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    backend: Callable[[LoadedModel], AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """The HSI single-head sweep of `finesteer locate hsi`, its plots, diagnostics and verdict.
    `backend(lm)` opens where the per-layer jobs run (local or Ray actors); None: in process."""
    items = load_ab_set(data, GENERATE_SPLIT, limit)
    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype)
    with backend(lm) if backend is not None else nullcontext() as runner:
        run = sweep_hsi_heads(
            lm, items, alphas, n_sweep=n_sweep, seed=seed, heads=heads, directions_from=directions_from,
            completions=completions, n_samples=n_samples, prompt=ABPrompt(system), batch_size=batch_size,
            rank_by=rank_by, run_dir=out, balance_letters=balance_letters, balance_format=balance_format,
            backend=runner,
        )  # fmt: skip
    plots = plot_sweep(run.sweep, out, rank_by=rank_by, diagnostics=run.directions.diagnostics)
    summary = run.sweep.summary(top=10, rank_by=rank_by, diagnostics=run.directions.diagnostics)
    diagnostics = run.directions.diagnostics
    warnings = diagnostics.warnings([(r["layer"], r["head"]) for r in summary["top"]]) if diagnostics else []
    for line in warnings:
        log.warning("HSI %s", line)
    verdict = sweep_verdict(run.sweep)
    say_verdict(verdict, "HSI sweep, best head")
    result = {
        "verdict": verdict["verdict"],
        "model": model, "data": data, "out": str(out), **summary,
        "sweep_verdict": verdict, "diagnostic_warnings": warnings,
        "balance_letters": balance_letters,
        "resumed_layers": run.sweep.meta.get("resumed_layers", []),
        "n_direction_items": run.n_direction_items, **run.source,
        "plots": [str(p) for p in plots], "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_run(out, {"command": "locate hsi", **result})
    return result


def locate_iti(
    model: str,
    data: str,
    out: Path,
    *,
    limit: int | None = None,
    n_val: int = 30,
    system: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    balance_letters: bool = True,
    say: Any = log.info,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Per-head probes of `finesteer locate iti` (train items), ranked by val accuracy; heatmap."""
    items = load_ab_set(data, GENERATE_SPLIT, limit)
    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype)
    train, val = split_items(items, n_val, seed)
    if balance_letters:
        train, val = letter_balanced(train, strict=False), letter_balanced(val, strict=False)
    say(f"ITI probes on {model}: train {len(train)} items, val {len(val)}")
    probes, z, _ = probe_items(lm, train, val, system=system, batch_size=batch_size, seed=seed, progress=True)
    table = probes.head_scores(model_name=lm.name, model_fingerprint=lm.fingerprint, n_prompts=len(z))
    table.save(out / "head_scores")
    plot = plot_head_heatmap(table, out / "iti_val_accuracy.png", label="probe val accuracy")
    top = [
        {"layer": layer, "head": h, "val_accuracy": float(probes.val_accuracy[layer, h]),
         "train_accuracy": float(probes.train_accuracy[layer, h])}
        for layer, h in probes.top_heads(10)
    ]  # fmt: skip
    result = {
        "model": model, "data": data, "out": str(out), "n_train_items": len(train),
        "n_val_items": len(val), "balance_letters": balance_letters, "top": top, "plots": [str(plot)],
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_run(out, {"command": "locate iti", **result})
    return result


__all__ = ["locate_hsi", "locate_iti"]
