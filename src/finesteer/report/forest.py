"""Plots of effects with their intervals, and the HTML report of a method comparison.

* `plot_forest`: one row per effect (method vs unmodified model, method vs its control), the point
  estimate and its 95% interval as a horizontal bar, and the zero line: an interval that crosses it
  is no reliable effect.
* `plot_rates`: each method's rate (A/B matching rate, refusal, over-refusal …) with its 95% interval
  as an error bar, and its control's mean with the spread over seeds beside it.
* `comparison_report`: the report `finesteer compare` writes (verdicts at the top, the table with
  intervals, both plots), built from the comparison's JSON — no model needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesteer.evaluate.compare_result import verdict_label
from finesteer.report.html import ReportContent, Table, render_html

__all__ = ["Effect", "Rate", "comparison_report", "effects_of", "plot_forest", "plot_rates", "rates_of"]


@dataclass(frozen=True)
class Effect:
    """One row of a forest plot: a difference and its interval (`kind`: what it is measured against)."""

    label: str
    difference: float
    low: float
    high: float
    kind: str = "vs control"


@dataclass(frozen=True)
class Rate:
    """One bar: a rate and its interval, with optionally its control's mean ± sd over seeds."""

    label: str
    value: float
    low: float
    high: float
    control: float | None = None
    control_sd: float | None = None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forest(effects: Sequence[Effect], path: str | Path, *, title: str = "", xlabel: str = "") -> Path:
    """A forest plot: each effect's point and 95% interval, grouped by `kind`, with the zero line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(effects) + 1.4))
    colours = {"vs control": "#1f5fa8", "vs unmodified": "#888888"}
    for i, effect in enumerate(reversed(effects)):
        colour = colours.get(effect.kind, "#b5452f")
        err = [[effect.difference - effect.low], [effect.high - effect.difference]]
        ax.errorbar(effect.difference, i, xerr=err, fmt="o", color=colour, capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(effects)), [f"{e.label} ({e.kind})" for e in reversed(effects)])
    ax.set_xlabel(xlabel or "difference (95% paired interval)")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rates(rates: Sequence[Rate], path: str | Path, *, title: str = "", ylabel: str = "rate") -> Path:
    """Each rate as a bar with its 95% interval; its control's mean ± sd over seeds beside it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rates) + 2), 3.6))
    x = list(range(len(rates)))
    values = [r.value for r in rates]
    errors = [[r.value - r.low for r in rates], [r.high - r.value for r in rates]]
    ax.bar(x, values, width=0.4, yerr=errors, capsize=4, color="#1f5fa8", label="method (95% CI)")
    with_control = [(i, r) for i, r in enumerate(rates) if r.control is not None]
    if with_control:
        ax.bar(
            [i + 0.42 for i, _ in with_control],
            [r.control for _, r in with_control],
            width=0.4,
            yerr=[r.control_sd or 0.0 for _, r in with_control],
            capsize=4,
            color="#bbbbbb",
            label="control (mean ± sd over seeds)",
        )
        ax.legend(fontsize=8)
    ax.set_xticks(x, [r.label for r in rates], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def effects_of(methods: Mapping[str, Mapping[str, Any]], key: str = "matching") -> list[Effect]:
    """The forest rows of a comparison's `methods`: vs its control and vs the unmodified model."""
    rows: list[Effect] = []
    for name, row in methods.items():
        for source, kind in (("vs_control", "vs control"), ("vs_baseline", "vs unmodified")):
            effect = (row.get(source) or {}).get(key) or {}
            if None not in (effect.get("difference"), effect.get("low"), effect.get("high")):
                rows.append(Effect(name, effect["difference"], effect["low"], effect["high"], kind))
    return rows


def rates_of(methods: Mapping[str, Mapping[str, Any]]) -> list[Rate]:
    """The A/B matching rate of each method with its Wilson interval and its control's spread."""
    rates: list[Rate] = []
    for name, row in methods.items():
        estimate = ((row.get("ab_interval") or {}).get("matching_rate")) or {}
        if None in (estimate.get("value"), estimate.get("low"), estimate.get("high")):
            continue
        spread = row.get("control_matching_rate") or {}
        rates.append(
            Rate(
                name,
                estimate["value"],
                estimate["low"],
                estimate["high"],
                spread.get("mean"),
                spread.get("std"),
            )
        )
    return rates


def comparison_report(
    payload: Mapping[str, Any], columns: Sequence[str], rows: Sequence[Sequence[Any]], folder: str | Path
) -> Path:
    """`folder/report.html` for a comparison (`ComparisonResult.to_json()` and its table cells):
    each method's verdict first, then the table, the rates with error bars and the forest plot."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    methods = payload.get("methods", {})
    images: list[tuple[str, Path]] = []
    rates = rates_of(methods)
    if rates:
        plot = plot_rates(rates, folder / "rates.png", title="A/B matching rate", ylabel="matching rate")
        images.append(("A/B matching rate with 95% intervals; grey: the matched control", plot))
    effects = effects_of(methods)
    if effects:
        plot = plot_forest(effects, folder / "forest.png", title="Change of the A/B matching rate")
        images.append(("forest plot: each method vs its control and vs the unmodified model", plot))
    verdicts = [
        (name, verdict_label(row.get("verdict") or {}), _why(row.get("verdict") or {}))
        for name, row in methods.items()
    ]
    content = ReportContent(
        title=f"finesteer compare: {payload.get('model', '')} · {payload.get('data', '')}",
        subtitle=f"{payload.get('n_ab', '')} A/B test items · judge {payload.get('judge', '')}",
        verdicts=verdicts,
        tables=[Table("Methods side by side", list(columns), [list(r) for r in rows])],
        images=images,
        summary={"controls per method": payload.get("settings", {}).get("controls")},
    )
    return render_html(content, folder / "report.html")


def _why(verdict: Mapping[str, Any]) -> str:
    against = verdict.get("against")
    reasons = "; ".join(str(r) for r in [*(verdict.get("reasons") or []), *(verdict.get("caveats") or [])])
    parts = [f"against {against}" if against else "", reasons]
    return " · ".join(p for p in parts if p)
