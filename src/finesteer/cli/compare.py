"""`finesteer compare`: fit and evaluate several steering methods on one behaviour, or compare run folders.

The A/B task reads a behaviour dataset's `generate` split and divides it with a seeded shuffle into
train and val (`finesteer.methods.load_behaviour_data`, as `fit caa` does), and evaluates on the
`test_ab` and `test_open_ended` splits; the refusal task is `eval sta-refusal`. Rerunning with the same
`--out` skips the methods already finished there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.cli.eval import run_refusal
from finesteer.cli.options import (
    ABDataOpt,
    BatchOpt,
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    EvalDataOpt,
    JsonFlag,
    OptionError,
    SeedOpt,
    TrainLimitOpt,
    ValFractionOpt,
    ValLimitOpt,
    data_source,
    parse_names,
    parse_settings,
    slug,
)

DEFAULT_METHODS = "baseline,prompt,caa,iti,lora,hsi"
DEFAULT_REFUSAL_METHODS = "baseline,prompt,caa,sae_all,sta"
TASKS = ("auto", "ab", "refusal")


@app.command("compare")
def compare_command(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="One model (fit and compare methods on a behaviour), or several finished run folders "
            "(put them side by side in one report).",
        ),
    ],
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (registry names, or 'module:Class' targets). Default: "
            f"{DEFAULT_METHODS} (A/B task), {DEFAULT_REFUSAL_METHODS} (refusal task)."
        ),
    ] = None,
    task: Annotated[
        str,
        typer.Option(
            help="ab: a CAA-style A/B behaviour (--data); refusal: steer towards refusing harmful "
            "requests and measure refusal, over-refusal and fluency (needs --sae for sae_all/sta); "
            "auto: refusal when --sae is given."
        ),
    ] = "auto",
    sae: Annotated[
        Path | None, typer.Option("--sae", help="SAE folder (refusal task), e.g. from `finesteer sae train`.")
    ] = None,
    lambdas: Annotated[
        str, typer.Option(help="Refusal task: multipliers λ swept for the vector methods.")
    ] = "0.5,1,1.5,2",
    headline: Annotated[float, typer.Option(help="Refusal task: λ reported under `methods`.")] = 1.0,
    n_harmful: Annotated[int, typer.Option(help="Refusal task: JailbreakBench prompts.")] = 40,
    n_harmless: Annotated[int, typer.Option(help="Refusal task: XSTest-safe prompts.")] = 40,
    n_pairs: Annotated[int, typer.Option(help="Refusal task: training triples.")] = 160,
    trim: Annotated[float, typer.Option(help="Refusal task: STA trim fraction.")] = 0.35,
    train_limit: TrainLimitOpt = None,
    val_limit: ValLimitOpt = None,
    test_limit: Annotated[int | None, typer.Option(help="Use the first N A/B test items.")] = None,
    open_ended_limit: Annotated[
        int | None, typer.Option(help="Use the first N open-ended questions.")
    ] = None,
    balanced: Annotated[
        bool,
        typer.Option(
            "--balanced/--single-order",
            help="Score the A/B test split in both option orders (a pure letter bias scores 0.5); default. "
            "--single-order scores each item once, as written.",
        ),
    ] = True,
    harmless_data: Annotated[str, typer.Option(help="Harmless prompts for the KL column.")] = "alpaca",
    harmless_limit: Annotated[int, typer.Option(help="Harmless prompts for the KL (0 = no KL).")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per open-ended reply.")] = 64,
    ab_max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated A/B answer.")] = 32,
    judge: Annotated[str, typer.Option(help="auto | llm | local | none (auto: llm if configured).")] = "auto",
    judge_model: Annotated[str, typer.Option(help="Registry model used by the local judge.")] = (
        "qwen2.5-coder-0.5b-instruct"
    ),
    settings: Annotated[
        str | None,
        typer.Option(help='Per-method settings as JSON or a .json file, e.g. \'{"hsi": {"k": 4}}\'.'),
    ] = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    out: Annotated[
        Path | None, typer.Option("--out", help="Results folder (default runs/compare-<model>-<data>).")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    eval_data: EvalDataOpt = None,
    json_out: JsonFlag = False,
    controls: Annotated[
        int,
        typer.Option(
            help="Matched controls per method (random heads / random direction of the same budget), "
            "seeds 0..N-1; the verdict is method − control. 0 = off (then against the unmodified model).",
        ),
    ] = 3,
) -> None:
    """Fit and evaluate several steering methods on one behaviour, or compare finished run folders."""
    from rich.console import Console

    from finesteer.report.runs import compare_runs, is_run_folder

    if targets and all(is_run_folder(t) for t in targets):
        report = Path(out) / "compare.html" if out else Path("runs") / "compare-runs.html"

        def side_by_side() -> dict[str, Any]:
            report.parent.mkdir(parents=True, exist_ok=True)
            return compare_runs(targets, report)

        result = run_command(side_by_side)
        if json_out:
            emit_json(result)
        else:
            Console().print(
                f"{len(result['rows'])} method rows from {len(targets)} runs; report: {result['report']}"
            )
        return
    model = run_command(lambda: _one_model(targets, task))
    if task == "refusal" or (task == "auto" and sae is not None):
        _compare_refusal(
            model, sae, out, methods or DEFAULT_REFUSAL_METHODS, lambdas, headline, n_harmful, n_harmless,
            n_pairs, trim, max_new_tokens, batch_size, json_out, controls, device=device, dtype=dtype,
        )  # fmt: skip
        return
    from finesteer.recipes.compare import ABComparison, run_ab_comparison

    def work() -> Any:
        names = parse_names(methods or DEFAULT_METHODS, "--methods")
        options = ABComparison(
            data=data_source(data, columns, "ab"), methods=names, settings=parse_settings(settings),
            val_fraction=val_fraction,
            seed=seed, train_limit=train_limit, val_limit=val_limit, test_limit=test_limit,
            open_ended_limit=open_ended_limit, balanced=balanced, harmless_data=harmless_data,
            harmless_limit=harmless_limit, max_new_tokens=max_new_tokens, ab_max_new_tokens=ab_max_new_tokens,
            judge=judge, judge_model=judge_model, batch_size=batch_size,  # type: ignore[arg-type]
            device=device, dtype=dtype,
            eval_data=tuple(str(p) for p in eval_data or ()),
            controls=controls,
        )  # fmt: skip
        return run_ab_comparison(model, options, out, log=stderr_console().print)

    comparison = run_command(work)
    if json_out:
        emit_json(comparison.to_json())
        return
    console = Console() if Console().is_terminal else Console(width=160)  # a log file: no wrapping
    console.print(comparison.table())
    console.print(comparison.table(effects=False))
    if comparison.has_eval_sets():
        console.print(comparison.eval_sets_table())


def _one_model(targets: list[str], task: str) -> str:
    """The model `compare` fits on: the one target that is not a run folder (and a known --task)."""
    from finesteer.report.runs import is_run_folder

    if len(targets) != 1:
        not_runs = [t for t in targets if not is_run_folder(t)]
        raise OptionError(
            f"give one model, or only finished run folders ({', '.join(not_runs)} is not a run folder)"
        )
    if task not in TASKS:
        raise OptionError(f"unknown --task {task!r}; choose {', '.join(TASKS)}")
    return targets[0]


def _compare_refusal(
    model: str,
    sae: Path | None,
    out: Path | None,
    methods: str,
    lambdas: str,
    headline: float,
    n_harmful: int,
    n_harmless: int,
    n_pairs: int,
    trim: float,
    max_new_tokens: int,
    batch_size: int,
    json_out: bool,
    controls: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """`compare --task refusal`: the STA refusal experiment (`eval sta-refusal`) under `compare`."""
    def work() -> dict[str, Any]:
        if sae is None:
            raise OptionError(
                "the refusal task steers through an SAE: pass --sae FOLDER (train one with "
                "`finesteer sae train`)"
            )
        folder = out or Path("runs") / f"compare-{slug(model)}-refusal"
        return run_refusal(
            model, sae, folder, methods=methods, lambdas=lambdas, headline=headline,
            n_harmful=n_harmful, n_harmless=n_harmless, n_pairs=n_pairs, trim=trim,
            max_new_tokens=max_new_tokens, batch_size=batch_size, controls=controls,
            device=device, dtype=dtype,
        )  # fmt: skip

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    from finesteer.evaluate.refusal_effects import effects_table

    title = f"Refusal steering on {model} (λ = {headline:g}), [95% intervals], {controls} control seeds"
    table = Table(title=title)
    columns, rows = effects_table(result["methods"])
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console() if Console().is_terminal else Console(width=160)  # a log file: no wrapping
    console.print(table)
