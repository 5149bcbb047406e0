"""Plots of an HSI single-head sweep (`finesteer.locate.hsi_table.HsiSweep`), and of each head's
direction diagnostics (`finesteer.activations.diagnostics`) beside it when they are given."""

from __future__ import annotations

from pathlib import Path

import torch

from finesteer.activations.diagnostics import DirectionDiagnostics
from finesteer.activations.directions import HeadDirections
from finesteer.fit.hsi_directions import DIRECTIONS_FILE
from finesteer.locate.hsi import SWEEP_FILE
from finesteer.locate.hsi_table import HsiSweep, RankBy
from finesteer.report.heatmap import plot_head_heatmap


def plot_sweep(
    sweep: HsiSweep,
    folder: str | Path,
    *,
    rank_by: RankBy = "balanced",
    top: int = 8,
    diagnostics: DirectionDiagnostics | None = None,
) -> list[Path]:
    """Heatmaps: the ranking gain, mean p_matching at each α, and (with `diagnostics`) each head's
    consistency of per-item differences and AUROC along its direction (one PNG each)."""
    folder = Path(folder)
    scores = sweep.head_scores(rank_by)
    model = sweep.meta.get("model_name", "")
    paths = [
        plot_head_heatmap(
            scores,
            folder / "hsi_gain.png",
            title=f"HSI {rank_by} gain in p(matching), best α · {model}",
            annotate_top=top,
            label="Δ p(matching)",
            cmap="RdBu_r",
        )
    ]
    swept = sweep.swept
    for i, alpha in enumerate(sweep.alphas):
        table = sweep.p_matching[..., i]
        table = torch.where(swept, table, torch.full_like(table, sweep.baseline_mean))
        paths.append(
            plot_head_heatmap(
                table,
                folder / f"hsi_p_matching_alpha_{alpha:g}.png",
                title=f"p(matching) steering one head, α={alpha:g} (baseline {sweep.baseline_mean:.3f})",
                annotate_top=0,
                label="p(matching)",
                cmap="RdBu_r",
            )
        )
    if diagnostics is not None:
        for key, label in (("consistency", "mean cos(per-item diff, mean diff)"), ("auroc", "AUROC")):
            paths.append(
                plot_head_heatmap(
                    getattr(diagnostics, key).float(),
                    folder / f"hsi_direction_{key}.png",
                    title=f"HSI direction diagnostics: {label} · {model}",
                    annotate_top=0,
                    label=label,
                    cmap="viridis",
                )
            )
    return paths


def plot_sweep_folder(run_dir: str | Path, *, rank_by: RankBy = "balanced", top: int = 8) -> list[Path]:
    """`plot_sweep` of the sweep table a run folder holds (written by `sweep_heads` / `fit_hsi`), into it."""
    folder = Path(run_dir)
    saved = folder / DIRECTIONS_FILE
    diagnostics = HeadDirections.load(saved).diagnostics if saved.is_file() else None
    sweep = HsiSweep.load(folder / SWEEP_FILE)
    return plot_sweep(sweep, folder, rank_by=rank_by, top=top, diagnostics=diagnostics)


__all__ = ["plot_sweep", "plot_sweep_folder"]
