"""The ranking certificate in a report: how many heads a pre-ranked scan did not verify, and the
estimated probability that one of them belongs in the top-k (`finesteer.locate.attribution.certify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesteer.report.heatmap import plot_attribution_maps
from finesteer.report.html import ReportContent, Table, render_html

REPORT_FILE = "report.html"


def bound_table(bound: dict[str, Any]) -> Table:
    """A small key/value table of a saved bound (`MissBound.to_dict()`)."""
    calibration = bound.get("calibration", {})
    rows = [
        ["heads not verified", bound["heads_not_verified"]],
        [f"P(one of them belongs in the top-{bound['k']})", bound["p_miss"]],
        ["k-th best exact value (threshold)", bound.get("threshold")],
        [
            "random low-ranked heads verified / in the top-k",
            f"{bound['sample_size']} / {bound['sample_hits']}",
        ],
        ["stopped by", bound["stopped"]],
        [
            "calibration (space, μ, s, n)",
            ", ".join(str(calibration.get(k)) for k in ("space", "mu", "sd", "n")),
        ],
    ]
    note = (
        "p = 1 − Π (1 − q_j) over the unverified heads, q_j = P(exact_j > threshold) under the Student-t "
        "predictive model of the verified heads' residuals g(exact) − g(estimate)."
    )
    return Table("Ranking certificate", ["", "value"], rows, note)


def attribution_report(folder: Path, result: Any, payload: dict[str, Any]) -> Path:
    """A `locate attribution` run's heatmaps (estimate, verified) and `report.html`: the top heads, the
    certificate and the heatmaps. `result` is the `PreRankedScan`, `payload` what the run saved."""
    plot_attribution_maps(result.estimate, result.scores, folder, payload["model"])
    heads = [
        [h["head"], h["exact"] if h["exact"] is not None else "not verified"] for h in payload["top_heads"]
    ]
    tables = [Table("Top heads", ["head", "exact effect"], heads)]
    if payload.get("bound"):
        tables.append(bound_table(payload["bound"]))
    keys = ("model", "data", "n_prompts", "mode", "metric", "top_n", "seconds")
    content = ReportContent(
        title=f"Head attribution of {payload['model']}",
        summary={k: payload[k] for k in keys if k in payload},
        tables=tables,
        images=[(p.stem.replace("_", " "), p) for p in sorted(folder.glob("*.png"))],
    )
    return render_html(content, folder / REPORT_FILE)
