"""`finesteer run` (a recipe into a resumable run folder) and `finesteer demo` (a built-in recipe)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from finesteer.cli.apps import app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.cli.options import (
    DeviceOpt,
    DeviceOverrideOpt,
    DtypeOpt,
    DtypeOverrideOpt,
    JsonFlag,
    OptionError,
)
from finesteer.runs import RESULT_JSON, STEPS_DIR


def _print_table(console: Console, table: dict[str, Any]) -> None:
    """A recipe's table (`table`: title, columns, rows of cells)."""
    out = Table(title=table["title"])
    for column in table["columns"]:
        out.add_column(column)
    for row in table["rows"]:
        out.add_row(*(str(cell) for cell in row))
    console.print(out)


def _print_result(metrics: dict[str, Any], run_dir: Path) -> None:
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the effect table on one line a row
        console = Console(width=120)
    verdict = metrics.get("table")
    if verdict:  # the verdict first (a result that does not hold says so in its first line) and last
        console.print(verdict["verdict_line"].split(" — ")[0], markup=False)
    methods = metrics.get("methods", {})
    if methods and not verdict:
        table = Table(title=metrics.get("title", "results"))
        columns = sorted({key for values in methods.values() for key in values})
        for column in ("method", *columns):
            table.add_column(column)
        for name, values in methods.items():
            cells = [values.get(c) for c in columns]
            table.add_row(name, *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells))
        console.print(table)
    if metrics.get("eval_sets"):  # recipe field eval_data: one row per test set
        rows = metrics["eval_sets"]
        _print_table(
            console,
            {"title": "A/B matching rate per test set", "columns": list(rows[0]),
             "rows": [[f"{v:.3f}" if isinstance(v, float) else v for v in r.values()] for r in rows]},
        )  # fmt: skip
    for example in metrics.get("examples", [])[:3]:
        ex = Table(show_lines=True, title=example["prompt"][:100])
        ex.add_column("before")
        ex.add_column("after")
        ex.add_row(example["before"], example["after"])
        console.print(ex)
    if verdict:
        _print_table(console, verdict)
        console.print(verdict["verdict_line"], markup=False)
    console.print(f"report: {run_dir / 'report.html'}")


def _execute(
    recipe_path: Path | None,
    resume: Path | None,
    out: Path,
    stop_after: str | None,
    placement: dict[str, str] | None = None,
) -> tuple[Path, Any]:
    from finesteer.recipes import RunFolder, execute, load_recipe, prepare

    command = "finesteer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if resume is not None:  # a recipe given too must be the one the run was started with
        run = RunFolder.open(resume, load_recipe(recipe_path) if recipe_path is not None else None)
    elif recipe_path is not None:
        recipe = load_recipe(recipe_path)
        if placement:  # --device/--dtype override the recipe's own (validated again by the recipe model)
            recipe = recipe.model_copy(update=placement)
        prepare(recipe)  # fail on bad fields before creating anything
        run = RunFolder.create(out, recipe, command)
    else:
        raise OptionError("give a recipe file, or --resume RUN_DIR")
    run.stop_after = stop_after
    stderr_console().print(f"run folder: {run.path}")
    return run.path, execute(run)


@app.command("run")
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML (see examples/recipes/).")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted run folder.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where new run folders are created.")] = Path("runs"),
    stop_after: Annotated[str | None, typer.Option(hidden=True)] = None,
    device: DeviceOverrideOpt = None,
    dtype: DtypeOverrideOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """Run a recipe end to end into a run folder (config, data hashes, scores, artifacts, report)."""
    placement = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    run_dir, metrics = run_command(lambda: _execute(recipe, resume, out, stop_after, placement))
    _finish(run_dir, metrics, json_out)


def _finish(run_dir: Path, metrics: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json({"run_dir": str(run_dir), "report": str(run_dir / "report.html"), **metrics})
    else:
        _print_result(
            {
                "methods": metrics.get("methods", {}),
                "examples": _examples(run_dir),
                "title": metrics.get("summary", {}).get("behaviour", ""),
                "table": metrics.get("table"),
                "eval_sets": metrics.get("eval_sets"),
            },
            run_dir,
        )


def _examples(run_dir: Path) -> list[dict[str, str]]:
    import json

    path = run_dir / STEPS_DIR / "examples" / RESULT_JSON
    return json.loads(path.read_text()).get("examples", []) if path.is_file() else []


@app.command("demo")
def demo(
    model: Annotated[
        str | None, typer.Option(help="Model to run the demo on (default: the tour's own model).")
    ] = None,
    tour: Annotated[
        str,
        typer.Option(
            help="refusal: refusal heads of Qwen2.5-Coder-0.5B located and ablated vs random heads (ASR, "
            "intervals, verdict); hsi: the HSI coordination tour on SmolLM2 (prints its own verdict)."
        ),
    ] = "refusal",
    out: Annotated[Path, typer.Option(help="Where the run folder is created.")] = Path("runs"),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """The built-in demo: locate heads, edit them, measure against a control (interval, verdict), report."""
    import yaml

    from finesteer.recipes import RunFolder, prepare
    from finesteer.recipes.demo import tour_recipe, tour_verdict

    def work() -> tuple[Path, Any]:
        recipe = tour_recipe(tour, model).model_copy(update={"device": device, "dtype": dtype})
        prepare(recipe)  # bad model or sizes are refused before anything is written
        out.mkdir(parents=True, exist_ok=True)
        path = out / "demo-recipe.yaml"
        path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        run_dir, metrics = _execute(path, None, out, None)
        return run_dir, tour_verdict(RunFolder.open(run_dir), metrics)

    run_dir, metrics = run_command(work)
    _finish(run_dir, metrics, json_out)
