"""ITI fits write tables, never plots; `report.probes` draws the heatmap from them."""

from __future__ import annotations

from pathlib import Path

import torch

from finesteer.data.items import ABItem
from finesteer.fit.iti import PROBE_SCORES_DIR, SELECTION_FILE, fit_iti
from finesteer.locate.scores import HeadScores
from finesteer.models import LoadedModel
from finesteer.report.probes import PROBE_ACCURACY_PNG, plot_probe_accuracy, plot_probe_accuracy_folder

ITEMS = [
    ABItem(
        f"Question {i}?\n\nChoices:\n (A) yes\n (B) no",
        *(("(A)", "(B)") if i % 2 else ("(B)", "(A)")),
        str(i),
    )
    for i in range(8)
]


def test_fit_iti_writes_tables_and_report_draws_them(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["tiny-llama"]
    fitted = fit_iti(lm, ITEMS[:4], ITEMS[4:], k=3, alphas=(2.0,), run_dir=tmp_path, progress=False)
    assert (tmp_path / PROBE_SCORES_DIR).is_dir() and (tmp_path / SELECTION_FILE).is_file()
    assert not list(tmp_path.glob("*.png"))  # fitting never plots
    path = plot_probe_accuracy_folder(tmp_path)
    assert path == tmp_path / PROBE_ACCURACY_PNG and path.stat().st_size > 0
    table = HeadScores.load(tmp_path / PROBE_SCORES_DIR)
    assert table.method == "iti" and len(fitted.metadata["ranked_heads"]) == 3


def test_plot_probe_accuracy_takes_a_table(tmp_path: Path) -> None:
    table = HeadScores(torch.rand(3, 4), "iti", mode="probe_val_accuracy")
    assert plot_probe_accuracy(table, tmp_path / "p.png", annotate_top=2).is_file()
