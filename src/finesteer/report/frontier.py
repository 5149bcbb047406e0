"""The refusal-vs-cost frontier chart and its report table, drawn from `evaluate.frontier`'s table.

One series per intervention (a curve over strength, or one point), controls of one series as grey
points per seed, the unmodified model as a black star; error bars are the 95% intervals of both the
cost (x) and y. matplotlib through its object API only (as `report.heatmap`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finesteer.report.html import ReportContent, Table, render_html

X_LABELS = {
    "kl": "next-token KL on harmless prompts (nats)",
    "over_refusal": "over-refusal rate (XSTest safe)",
}


def _err(estimate: Mapping[str, Any]) -> tuple[float, float]:
    value, low, high = estimate["value"], estimate.get("low"), estimate.get("high")
    low = value if low is None else low
    high = value if high is None else high
    return max(0.0, value - low), max(0.0, high - value)


def plot_frontier(
    table: Mapping[str, Any], path: str | Path, *, cost: str = "kl", title: str | None = None, dpi: int = 120
) -> Path:
    """Save a PNG: x = `cost` ("kl" or "over_refusal"), y = the table's y, error bars both ways."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in table["points"] if r[cost]["value"] is not None and r["y"]["value"] is not None]
    series: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        series.setdefault(row["series"], []).append(row)
    for name, points in series.items():
        points = sorted(points, key=lambda r: (r["strength"], r["seed"] or 0))
        kind = points[0]["kind"]
        xs = [p[cost]["value"] for p in points]
        ys = [p["y"]["value"] for p in points]
        xerr = list(zip(*(_err(p[cost]) for p in points), strict=True))
        yerr = list(zip(*(_err(p["y"]) for p in points), strict=True))
        if kind == "baseline":
            ax.errorbar(
                xs, ys, xerr=xerr, yerr=yerr, fmt="*", color="black", markersize=12, label=name, zorder=5
            )
        elif kind == "control":
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="x", color="grey", alpha=0.6, label=name, capsize=2)
        else:
            ax.errorbar(
                xs,
                ys,
                xerr=xerr,
                yerr=yerr,
                fmt="o-" if len(points) > 1 else "s",
                capsize=3,
                label=name,
                alpha=0.9,
            )
            for p, x, y in zip(points, xs, ys, strict=True):
                if len(points) > 1:
                    ax.annotate(
                        f"{p['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                    )
    if cost == "kl" and rows and all(r["kl"]["value"] > 0 for r in rows if r["kind"] != "baseline"):
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(X_LABELS.get(cost, cost))
    ax.set_ylabel(str(table.get("y_label", "y")))
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title or f"refusal frontier ({table.get('goal', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _fmt(estimate: Mapping[str, Any] | None, digits: int = 2) -> str:
    if not estimate or estimate.get("value") is None:
        return "–"
    value, low, high = estimate["value"], estimate.get("low"), estimate.get("high")
    n = f" (n={estimate['n']})" if estimate.get("n") is not None else ""
    if low is None or high is None:
        return f"{value:.{digits}f}{n}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]{n}"


def _signed(effect: Mapping[str, Any] | None) -> str:
    if not effect or effect.get("difference") is None:
        return "–"
    if effect.get("low") is None or effect.get("high") is None:
        return f"{effect['difference']:+.2f}"
    return f"{effect['difference']:+.2f} [{effect['low']:+.2f}, {effect['high']:+.2f}]"


def _verdict(verdict: Mapping[str, Any] | None) -> str:
    if not verdict:
        return "–"
    p = verdict.get("p_value")
    against = verdict.get("against") or "nothing"
    return f"{verdict['verdict']} (vs {against}" + ("" if p is None else f", p = {p:.2g}") + ")"


def frontier_table(table: Mapping[str, Any]) -> Table:
    """The report section: one row per point with y, KL, over-refusal, MC accuracy, Δy, y − control
    and the verdict."""
    rows = []
    for r in table["points"]:
        rows.append(
            [
                r["series"],
                r["strength"],
                r["kind"],
                "" if r["seed"] is None else r["seed"],
                _fmt(r["y"]),
                _fmt(r["kl"], 3),
                _fmt(r["over_refusal"]),
                _fmt(r["mc_accuracy"]),
                _fmt(r.get("p_refusal_first_token")),
                _signed(r.get("y_effect")),
                *([_fmt(r.get("share_of_reference"))] if table.get("reference") else []),
                _signed(r.get("vs_control")),
                _verdict(r.get("verdict")),
            ]
        )
    columns = [
        "series",
        "strength",
        "kind",
        "seed",
        str(table.get("y_label", "y")),
        "KL (harmless)",
        "over-refusal",
        "MC accuracy",
        "p(refusal), first token",
        "Δy vs unmodified",
        *([f"share of {table['reference']}'s Δy"] if table.get("reference") else []),
        "y − control [CI]",
        "verdict (Holm over the points)",
    ]
    note = (
        "95% intervals: Wilson for rates, bootstrap for the KL mean, paired bootstrap for Δy, shares and "
        "y − control (the per-prompt mean of the random controls at the same size or λ). A point without "
        "controls is judged against the unmodified model."
    )
    return Table("Refusal frontier", columns, rows, note)


def equal_cost_table(comparison: Mapping[str, Any]) -> Table:
    """Each method's y at common cost levels (interpolated), the best method per level."""
    names = list(comparison["series"])
    rows = []
    for entry in comparison["by_level"]:
        cells = [
            _fmt(entry["methods"][n]) if entry["methods"][n]["value"] is not None else "–" for n in names
        ]
        best = entry.get("best", "–") + (" (separated)" if entry.get("separated") else "")
        rows.append([entry["level"], *cells, best])
    title = f"At equal {comparison['cost'].replace('_', '-')}"
    note = (
        "Linear interpolation along each method's λ curve (from the unmodified model); "
        "interval bounds interpolated."
    )
    return Table(title, [comparison["cost"], *names, "best"], rows, note)


def markdown(table: Table) -> str:
    """A report `Table` as a Markdown table (for docs/results notes and the CLI's stderr)."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in table.rows
    ]
    return "\n".join(lines)


def frontier_report(table: Mapping[str, Any], folder: str | Path) -> Path:
    """`report.html` in `folder`: the frontier table, both equal-cost comparisons and both charts."""
    folder = Path(folder)
    tables = [frontier_table(table)]
    tables += [equal_cost_table(table[k]) for k in ("equal_over_refusal", "equal_kl") if k in table]
    content = ReportContent(
        title=f"Refusal frontier: {table.get('model', '')}",
        subtitle=f"goal {table.get('goal')}: y = {table.get('y_label')}",
        tables=tables,
        images=[(f"x = {X_LABELS[c]}", folder / f"frontier_{c}.png") for c in ("kl", "over_refusal")],
    )
    return render_html(content, folder / "report.html")


__all__ = ["equal_cost_table", "frontier_report", "frontier_table", "markdown", "plot_frontier"]
