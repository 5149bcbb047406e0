"""Report stage: plots of located heads and evaluation results (matplotlib, Agg backend)."""

from __future__ import annotations

from finesteer.report.heatmap import plot_head_heatmap

__all__ = ["plot_head_heatmap"]
