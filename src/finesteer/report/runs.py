"""Put several finished run folders (models, methods, behaviours) side by side in one report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.report.html import ReportContent, Table, render_html
from finesteer.runs import METRICS_JSON, RECIPE_YAML, RUN_JSON


class RunFolderError(FinesteerError, ValueError):
    """A folder that is not a finished finesteer run (or no folders at all)."""


def is_run_folder(path: str | Path) -> bool:
    folder = Path(path)
    return (folder / RUN_JSON).is_file() and (folder / RECIPE_YAML).is_file()


def _load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = json.loads((folder / RUN_JSON).read_text())
    metrics_path = folder / METRICS_JSON
    if not metrics_path.is_file():
        raise RunFolderError(f"{folder}: the run has not finished (no metrics.json); resume it first")
    return state, json.loads(metrics_path.read_text())


def _verdicts(label: str, metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The verdicts a run recorded: its summary's `verdict …` entries and each method's `verdict`."""
    found = [(f"{label}: {k}", str(v), "") for k, v in metrics.get("summary", {}).items() if "verdict" in k]
    for method, values in metrics.get("methods", {}).items():
        verdict = values.get("verdict") if isinstance(values, dict) else None
        if isinstance(verdict, dict):
            found.append(
                (f"{label}: {method}", str(verdict.get("verdict")), str(verdict.get("against") or ""))
            )
        elif verdict is not None:
            found.append((f"{label}: {method}", str(verdict), ""))
    return found


def compare_runs(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """One HTML report with every run's methods and headline numbers; returns the combined table."""
    if not folders:
        raise RunFolderError("no run folders to compare")
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    images: list[tuple[str, Path]] = []
    verdicts: list[tuple[str, str, str]] = []
    for raw in folders:
        folder = Path(raw)
        if not is_run_folder(folder):
            raise RunFolderError(f"{folder} is not a finesteer run folder (no run.json / recipe.yaml)")
        state, metrics = _load(folder)
        label = folder.name
        summaries[label] = metrics.get("summary", {})
        verdicts += _verdicts(label, metrics)
        for method, values in metrics.get("methods", {}).items():
            numbers = {
                k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            rows.append({"run": label, "model": state.get("model"), "method": method, **numbers})
        images.extend(
            (f"{label}: {p.stem.replace('_', ' ')}", p) for p in sorted(folder.glob("steps/*/*.png"))
        )
    columns = ["run", "model", "method", *sorted({k for r in rows for k in r} - {"run", "model", "method"})]
    tables = [Table("All runs, all methods", columns, [[r.get(c, "") for c in columns] for r in rows])]
    for label, summary in summaries.items():
        tables.append(Table(f"Summary: {label}", ["key", "value"], [[k, v] for k, v in summary.items()]))
    content = ReportContent(
        title=f"finesteer: {len(folders)} runs side by side",
        subtitle=", ".join(Path(f).name for f in folders),
        tables=tables,
        images=images,
        commands=["finesteer compare " + " ".join(str(f) for f in folders)],
        verdicts=verdicts,
    )
    path = render_html(content, out)
    return {"report": str(path), "rows": rows}
