"""Layer × head heatmap of a `HeadScores` table, with the top heads marked.

matplotlib is imported inside the function and used through its object API (`Figure`, rendered by
Agg), never pyplot: plotting works on headless machines, touches no global backend or figure state
(safe inside notebooks), and importing finesteer never pulls in a GUI toolkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from finesteer.locate.run_folder import ESTIMATE_DIR, HEATMAP_FILE
from finesteer.locate.scores import HeadScores

# Colour maps whose middle colour means "no effect": their scale is centred on `center` (0 or the
# baseline), so a table whose gains are all ≤ 0 is drawn in the "worse" half, never as a deep "better".
DIVERGING = frozenset(
    {"RdBu", "RdBu_r", "coolwarm", "bwr", "seismic", "PiYG", "PRGn", "BrBG", "PuOr", "RdGy", "RdYlBu"}
)


def color_norm(values: np.ndarray, cmap: str, center: float | None) -> Any:
    """The colour normalisation of a heatmap: centred on `center` (default 0) for a diverging `cmap`
    or whenever `center` is given (a symmetric range around it), else matplotlib's min–max."""
    from matplotlib.colors import CenteredNorm, Normalize

    if center is None and cmap not in DIVERGING:
        return Normalize()
    vcenter = 0.0 if center is None else float(center)
    finite = values[np.isfinite(values)]
    halfrange = float(np.abs(finite - vcenter).max()) if finite.size else 1.0
    return CenteredNorm(vcenter=vcenter, halfrange=halfrange or 1.0)


def plot_head_heatmap(
    scores: HeadScores | Tensor,
    path: str | Path,
    *,
    title: str | None = None,
    annotate_top: int = 5,
    label: str = "score",
    cmap: str = "viridis",
    center: float | None = None,
    dpi: int = 120,
) -> Path:
    """Save a PNG of the [n_layers, n_heads] table (layers on y, heads on x).

    The `annotate_top` best heads get a box and their rank, so the picture says which heads a
    ranking picked without reading the JSON. A diverging `cmap` (e.g. "RdBu_r" for gains) is centred
    on `center` (default 0; pass the baseline, e.g. 0.5 for accuracies); `center` with any other
    colour map centres it too.
    """
    from matplotlib import patheffects
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    table = scores if isinstance(scores, HeadScores) else HeadScores(scores=scores, method="scores")
    if annotate_top < 0:
        raise ValueError(f"annotate_top must be ≥ 0, got {annotate_top}")
    values = table.scores.to(torch.float64).numpy()
    n_layers, n_heads = table.shape
    width = min(4.0 + 0.35 * n_heads, 24.0)
    height = min(2.5 + 0.25 * n_layers, 24.0)
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    norm = color_norm(values, cmap, center)
    image = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    if title is None:
        parts = [table.method, table.mode or "", table.model_name]
        title = " · ".join(p for p in parts if p)
    ax.set_title(title)
    marked = table.top(min(annotate_top, n_layers * n_heads)) if annotate_top else []
    for rank, (layer, head, _) in enumerate(marked, start=1):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        text = ax.text(head, layer, str(rank), ha="center", va="center", color="white", fontsize=7)
        text.set_path_effects([patheffects.withStroke(linewidth=1.5, foreground="black")])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_attribution_maps(estimate: HeadScores, verified: HeadScores, folder: Path, model: str) -> None:
    """An attribution run's two heatmaps: every head's estimate, and the exactly verified heads."""
    plot_head_heatmap(estimate, folder / ESTIMATE_DIR / HEATMAP_FILE, title=f"estimate · {model}")
    plot_head_heatmap(verified, folder / HEATMAP_FILE, title=f"verified heads · {model}")
