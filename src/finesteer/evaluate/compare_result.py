"""The result of an A/B comparison: per-method rows plus what was compared how, as JSON or a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.evaluate.answer_bias import ANSWER_BIAS

if TYPE_CHECKING:
    from rich.table import Table


@dataclass
class ComparisonResult:
    """Per-method results (in run order) plus what was compared how."""

    methods: dict[str, dict[str, Any]]
    judge: str
    info: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "judge": self.judge,
            "methods": self.methods,
            "out_dir": str(self.out_dir) if self.out_dir is not None else None,
        }

    def table(self, title: str | None = None, *, effects: bool = True) -> Table:
        """One row per method. `effects`: the A/B matching rate with its 95% interval, the change
        against the unmodified model, the control (mean ± sd over seeds), method − control, p and the
        verdict; otherwise the other measures (p(matching), generated answers, judge, fluency, KL)."""
        from rich.table import Table

        default = f"{self.info.get('model', '')} · {self.info.get('data', '')}"
        table = Table(title=title or (default if effects else f"{default}: other measures"))
        chosen = range(N_EFFECT_COLUMNS) if effects else [0, *range(N_EFFECT_COLUMNS, len(TABLE_COLUMNS))]
        for i in chosen:
            column = TABLE_COLUMNS[i]
            table.add_column(column, justify="left" if column in ("method", "verdict") else "right")
        for name, row in self.methods.items():
            cells = table_row(name, row)
            table.add_row(*[cells[i] for i in chosen])
        if not effects:
            table.caption = "[95% intervals]: bootstrap over items (Wilson for rates)"
            return table
        n_controls = self.info.get("settings", {}).get("controls")
        controls = "controls off (--controls 0)" if n_controls == 0 else f"{n_controls} control seeds"
        table.caption = (
            f"judge: {self.judge} · [95% intervals] · n = {self.info.get('n_ab')} A/B items · {controls} · "
            "verdict: method − control (or − unmodified model when no control), Holm-adjusted over methods"
        )
        for name, caveat in self.caveats():
            table.caption += f"\n⚠ {name}: {caveat}"
        return table

    def caveats(self) -> list[tuple[str, str]]:
        """(method, caveat) for every qualified verdict, e.g. an answer bias (`answer_bias`)."""
        return [
            (name, str(caveat))
            for name, row in self.methods.items()
            for caveat in (row.get("verdict") or {}).get("caveats") or []
        ]

    def has_eval_sets(self) -> bool:
        return any(row.get("eval_sets") for row in self.methods.values())

    def eval_sets_table(self) -> Table:
        """With `--eval-data`: the letter-probability matching rate, one row per test set (the
        behaviour's test split first), one column per method."""
        from rich.table import Table

        table = Table(title="A/B matching rate (prob) per test set")
        table.add_column("test set")
        table.add_column("n", justify="right")
        for name in self.methods:
            table.add_column(name, justify="right")
        rows = self.methods.values()
        main = [f"{self.info.get('data', '')} (test split)", str(self.info.get("n_ab", ""))]
        table.add_row(*main, *(f"{row['ab_matching_rate']:.2f}" for row in rows))
        first = next(iter(rows))
        for i, entry in enumerate(first.get("eval_sets", [])):
            cells = (f"{row['eval_sets'][i]['ab_matching_rate']:.2f}" for row in rows)
            table.add_row(entry["name"], str(entry["n"]), *cells)
        return table


TABLE_COLUMNS = (
    "method",
    "A/B match [95% CI]",
    "Δ vs unmodified [CI]",
    "control ± sd",
    "− control [CI]",
    "p",
    "verdict",
    "p(match)",
    "A/B gen",
    "open-ended [CI]",
    "fluency [CI]",
    "KL harmless [CI]",
)
"""The table's columns: the effect columns (the first `N_EFFECT_COLUMNS`), then the other measures."""
N_EFFECT_COLUMNS = 7


def _num(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(estimate: dict[str, Any] | None, digits: int = 2, key: str = "value") -> str:
    """The cell "v [lo, hi]" of an Estimate or PairedEffect dict; "–" when absent."""
    if not estimate or estimate.get(key) is None:
        return "–"
    text = f"{estimate[key]:+.{digits}f}" if key == "difference" else f"{estimate[key]:.{digits}f}"
    if estimate.get("low") is None or estimate.get("high") is None:
        return text
    return f"{text} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def verdict_label(verdict: dict[str, Any]) -> str:
    """The verdict cell: the label, marked "⚠ answer bias" when a polarity group moves the wrong way."""
    label = str(verdict.get("verdict", "–"))
    return f"{label} ⚠ {ANSWER_BIAS}" if verdict.get("caveats") else label


def table_row(name: str, row: dict[str, Any]) -> list[str]:
    """The terminal table's cells for one method (see `TABLE_COLUMNS`)."""
    interval = row.get("ab_interval") or {}
    rate = interval.get("matching_rate") or {"value": row.get("ab_matching_rate")}
    vs_base = (row.get("vs_baseline") or {}).get("matching")
    control = row.get("control") or {}
    spread = row.get("control_matching_rate")
    if spread and spread.get("mean") is not None:
        sd = spread.get("std")
        control_cell = f"{spread['mean']:.2f} ± {sd:.2f}" if sd is not None else f"{spread['mean']:.2f}"
    else:
        control_cell = "none" if name != "baseline" and control else "–"
    vs_control = (row.get("vs_control") or {}).get("matching")
    verdict = row.get("verdict") or {}
    generated = _num(row.get("ab_matching_rate_generated"))
    if row.get("ab_n_undefined"):
        generated += f" ({row['ab_n_undefined']} undef.)"
    return [
        name,
        _interval(rate),
        _interval(vs_base, key="difference"),
        control_cell,
        _interval(vs_control, key="difference"),
        _num(verdict.get("p_value"), 3),
        verdict_label(verdict),
        _num(row.get("ab_mean_p_matching")),
        generated,
        _interval(row.get("open_ended_interval") or {"value": row.get("open_ended_score")}),
        _interval(row.get("fluency_interval") or {"value": row.get("fluency")}),
        _interval(row.get("kl_interval") or {"value": row.get("kl_harmless")}, 3),
    ]


__all__ = ["N_EFFECT_COLUMNS", "TABLE_COLUMNS", "ComparisonResult", "table_row", "verdict_label"]
