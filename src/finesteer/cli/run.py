"""`finesteer run` (a recipe into a resumable run folder) and `finesteer demo` (a built-in recipe)."""

from __future__ import annotations

import shlex
import sys
from importlib import resources
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


def _print_result(metrics: dict[str, Any], run_dir: Path) -> None:
    console = Console()
    methods = metrics.get("methods", {})
    if methods:
        table = Table(title=metrics.get("title", "results"))
        columns = sorted({key for values in methods.values() for key in values})
        for column in ("method", *columns):
            table.add_column(column)
        for name, values in methods.items():
            cells = [values.get(c) for c in columns]
            table.add_row(name, *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells))
        console.print(table)
    for example in metrics.get("examples", [])[:3]:
        ex = Table(show_lines=True, title=example["prompt"][:100])
        ex.add_column("before")
        ex.add_column("after")
        ex.add_row(example["before"], example["after"])
        console.print(ex)
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
            },
            run_dir,
        )


def _examples(run_dir: Path) -> list[dict[str, str]]:
    import json

    path = run_dir / STEPS_DIR / "examples" / RESULT_JSON
    return json.loads(path.read_text()).get("examples", []) if path.is_file() else []


@app.command("demo")
def demo(
    model: Annotated[str, typer.Option(help="Model to run the demo on.")] = "smollm2-135m-instruct",
    out: Annotated[Path, typer.Option(help="Where the run folder is created.")] = Path("runs"),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """The built-in tour: locate the heads behind AI coordination, steer them, compare, write a report."""
    import yaml

    from finesteer.recipes import parse_recipe

    def work() -> tuple[Path, Any]:
        text = resources.files("finesteer.recipes").joinpath("demo.yaml").read_text()
        data = yaml.safe_load(text)
        data["model"] = model
        data["device"], data["dtype"] = device, dtype
        out.mkdir(parents=True, exist_ok=True)
        path = out / "demo-recipe.yaml"
        path.write_text(yaml.safe_dump(parse_recipe(data).model_dump(mode="json"), sort_keys=False))
        return _execute(path, None, out, None)

    run_dir, metrics = run_command(work)
    _finish(run_dir, metrics, json_out)

