"""Heatmaps of per-head probe accuracy (ITI), drawn from the tables the fit and locate stages return
or write: fitting and locating never plot."""

from __future__ import annotations

import json
from pathlib import Path

from finesteer.fit.iti import PROBE_SCORES_DIR, SELECTION_FILE
from finesteer.locate.scores import HeadScores
from finesteer.report.heatmap import plot_head_heatmap

PROBE_ACCURACY_PNG = "iti_val_accuracy.png"


def plot_probe_accuracy(scores: HeadScores, path: str | Path, *, annotate_top: int = 5) -> Path:
    """Save the layer × head heatmap of probe val accuracy, the `annotate_top` best heads marked."""
    return plot_head_heatmap(scores, path, annotate_top=annotate_top, label="probe val accuracy")


def plot_probe_accuracy_folder(run_dir: str | Path) -> Path:
    """The heatmap of a `fit_iti(run_dir=…)` folder: its probe table, with the k heads it ranked
    (and chose among) marked; written next to them as `iti_val_accuracy.png`."""
    run_dir = Path(run_dir)
    selection = json.loads((run_dir / SELECTION_FILE).read_text())
    table = HeadScores.load(run_dir / PROBE_SCORES_DIR)
    top = len(selection["ranked_heads"])
    return plot_probe_accuracy(table, run_dir / PROBE_ACCURACY_PNG, annotate_top=top)
