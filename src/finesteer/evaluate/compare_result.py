"""The result of an A/B comparison: per-method rows plus what was compared how, as JSON or a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    def table(self, title: str | None = None) -> Table:
        from rich.table import Table

        table = Table(title=title or f"{self.info.get('model', '')} · {self.info.get('data', '')}")
        columns = (
            "method",
            "A/B match (prob)",
            "p(match)",
            "A/B match (gen)",
            "open-ended",
            "fluency",
            "KL harmless",
        )
        for column in columns:
            table.add_column(column, justify="left" if column == "method" else "right")

        def num(value: Any, digits: int = 2) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        for name, row in self.methods.items():
            open_ended = num(row.get("open_ended_score"))
            if row.get("open_ended_std") is not None:
                open_ended += f" ± {row['open_ended_std']:.2f}"
            generated = num(row.get("ab_matching_rate_generated"))
            if row.get("ab_n_undefined"):
                generated += f" ({row['ab_n_undefined']} undef.)"
            table.add_row(
                name,
                num(row.get("ab_matching_rate")),
                num(row.get("ab_mean_p_matching")),
                generated,
                open_ended,
                num(row.get("fluency")),
                num(row.get("kl_harmless"), 3),
            )
        table.caption = f"judge: {self.judge}"
        return table

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


__all__ = ["ComparisonResult"]
