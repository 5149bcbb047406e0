"""Plots of an HSI single-head sweep (`finesteer.locate.hsi_table.HsiSweep`)."""

from __future__ import annotations

from pathlib import Path

import torch

from finesteer.locate.hsi import SWEEP_FILE
from finesteer.locate.hsi_table import HsiSweep, RankBy
from finesteer.report.heatmap import plot_head_heatmap


def plot_sweep(
    sweep: HsiSweep, folder: str | Path, *, rank_by: RankBy = "balanced", top: int = 8
) -> list[Path]:
    """Heatmaps: the ranking gain, and mean p_matching at each α (one PNG each)."""
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
    return paths


def plot_sweep_folder(run_dir: str | Path, *, rank_by: RankBy = "balanced", top: int = 8) -> list[Path]:
    """`plot_sweep` of the sweep table a run folder holds (written by `sweep_heads` / `fit_hsi`), into it."""
    folder = Path(run_dir)
    return plot_sweep(HsiSweep.load(folder / SWEEP_FILE), folder, rank_by=rank_by, top=top)


__all__ = ["plot_sweep", "plot_sweep_folder"]
