"""Baseline and comparison commands: `fit caa` and `compare`.

Both read a behaviour dataset's `generate` split and divide it with a seeded shuffle into train and
val (`finesteer.methods.load_behaviour_data`), so `fit caa` fits exactly what `compare` fits.
`compare` evaluates on the `test_ab` and `test_open_ended` splits; rerunning it with the same
`--out` skips the methods already finished there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app, fit_app
from finesteer.cli.common import emit_json, run_command, stderr_console

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ModelArg = Annotated[str, typer.Argument(help="Registry name, tiny-* name, HF folder or hub id.")]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="CAA-style A/B behaviour: coordinate-other-ais, sycophancy, myopic-reward…"),
]
TrainLimitOpt = Annotated[int | None, typer.Option(help="Use the first N training items (after the split).")]
ValLimitOpt = Annotated[int | None, typer.Option(help="Use the first N validation items.")]
ValFractionOpt = Annotated[float, typer.Option(help="Share of the generate split held out for validation.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the train/val split.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward.")]

DEFAULT_METHODS = "baseline,prompt,caa,iti,lora,hsi"
DEFAULT_REFUSAL_METHODS = "baseline,prompt,caa,sae_all,sta"
TASKS = ("auto", "ab", "refusal")


def _numbers(text: str | None, what: str, kind: type = float) -> tuple[Any, ...] | None:
    """A comma-separated option ('8,10,12') as numbers of `kind`; None when the option is not given."""
    if text is None:
        return None
    noun = "integers" if kind is int else "numbers"
    try:
        values = tuple(kind(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise ValueError(f"cannot parse {what} {text!r}: write {noun} separated by commas") from exc
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def parse_settings(text: str | None) -> dict[str, dict[str, Any]]:
    """--settings: a JSON object (or a path to a .json file) mapping method name → its settings."""
    if text is None:
        return {}
    path = Path(text)
    raw = path.read_text(encoding="utf-8") if path.suffix == ".json" and path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f'--settings must be JSON like \'{{"caa": {{"multipliers": [1, 2]}}}}\' or a .json file: {exc}'
        ) from exc
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("--settings must map each method name to an object of settings")
    return value


@fit_app.command("caa")
def fit_caa_command(
    model: ModelArg,
    data: DataOpt = "coordinate-other-ais",
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write.")] = Path("runs/caa"),
    layers: Annotated[
        str | None, typer.Option(help="Layers to sweep, e.g. '8,10,12' (default: all).")
    ] = None,
    multipliers: Annotated[
        str | None, typer.Option(help="Multiplier grid, comma-separated (default 0.5,1,2,5).")
    ] = None,
    direction: Annotated[str, typer.Option(help="'towards' the behaviour or 'away' from it.")] = "towards",
    system: Annotated[str | None, typer.Option(help="System prompt for every A/B prompt.")] = None,
    train_limit: TrainLimitOpt = None,
    val_limit: ValLimitOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    json_out: JsonFlag = False,
) -> None:
    """CAA: residual vectors at the answer letter, layer × multiplier chosen on val; writes an artifact."""
    from finesteer.fit.caa import DEFAULT_MULTIPLIERS, fit_caa
    from finesteer.methods import load_behaviour_data
    from finesteer.models import load_model
    from finesteer.scoring.ab import ABPrompt

    def work() -> dict[str, Any]:
        grid = _numbers(multipliers, "--multipliers") or DEFAULT_MULTIPLIERS
        chosen_layers = _numbers(layers, "--layers", int)
        behaviour = load_behaviour_data(
            data, val_fraction=val_fraction, train_limit=train_limit, val_limit=val_limit, seed=seed
        )
        started = time.perf_counter()
        lm = load_model(model)
        stderr_console().print(
            f"CAA on {model}: vectors from {len(behaviour.train)} items, layer × multiplier sweep on "
            f"{len(behaviour.val)} items"
        )
        fitted = fit_caa(
            lm,
            list(behaviour.train),
            list(behaviour.val),
            layers=chosen_layers,
            multipliers=grid,
            direction=direction,  # type: ignore[arg-type]
            prompt=ABPrompt(system),
            batch_size=batch_size,
            run_dir=out,
        )
        fitted.save(out, lm)
        meta = fitted.metadata
        return {
            "model": model,
            "data": data,
            "artifact": str(out),
            "layer": meta["layer"],
            "multiplier": meta["multiplier"],
            "vector_norm": meta["vector_norm"],
            "scope": meta["scope"],
            "val_mean_p_matching": meta["val_mean_p_matching"],
            "val_matching_rate": meta["val_matching_rate"],
            "val_baseline_mean_p_matching": meta["val_baseline_mean_p_matching"],
            "val_baseline_matching_rate": meta["val_baseline_matching_rate"],
            "data_splits": behaviour.summary(),
            "seconds": round(time.perf_counter() - started, 1),
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    stderr_console().print(
        f"layer {result['layer']}, multiplier {result['multiplier']:g} (|v| = {result['vector_norm']:.3g}), "
        f"scope {result['scope']}: val p(matching) {result['val_baseline_mean_p_matching']:.3f} → "
        f"{result['val_mean_p_matching']:.3f}, matching rate {result['val_baseline_matching_rate']:.2f} → "
        f"{result['val_matching_rate']:.2f}"
    )
    typer.echo(str(out))


@app.command("compare")
def compare_command(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="One model (fit and compare methods on a behaviour), or several finished run folders "
            "(put them side by side in one report).",
        ),
    ],
    data: DataOpt = "coordinate-other-ais",
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
            "--balanced",
            help="Score the A/B test split in both option orders (a pure letter bias scores 0.5).",
        ),
    ] = False,
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
    json_out: JsonFlag = False,
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
    if len(targets) != 1:
        not_runs = [t for t in targets if not is_run_folder(t)]
        Console(stderr=True).print(
            f"[bold red]error:[/] give one model, or only finished run folders ({', '.join(not_runs)} "
            "is not a run folder)",
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    model = targets[0]
    if task not in TASKS:
        Console(stderr=True).print(f"[bold red]error:[/] unknown --task {task!r}; choose {', '.join(TASKS)}")
        raise typer.Exit(code=2)
    if task == "refusal" or (task == "auto" and sae is not None):
        _compare_refusal(
            model, sae, out, methods or DEFAULT_REFUSAL_METHODS, lambdas, headline, n_harmful, n_harmless,
            n_pairs, trim, max_new_tokens, batch_size, json_out,
        )  # fmt: skip
        return
    from finesteer.recipes.compare import ABComparison, run_ab_comparison

    def work() -> Any:
        names = [n.strip() for n in (methods or DEFAULT_METHODS).split(",") if n.strip()]
        options = ABComparison(
            data=data, methods=names, settings=parse_settings(settings), val_fraction=val_fraction,
            seed=seed, train_limit=train_limit, val_limit=val_limit, test_limit=test_limit,
            open_ended_limit=open_ended_limit, balanced=balanced, harmless_data=harmless_data,
            harmless_limit=harmless_limit, max_new_tokens=max_new_tokens, ab_max_new_tokens=ab_max_new_tokens,
            judge=judge, judge_model=judge_model, batch_size=batch_size,  # type: ignore[arg-type]
        )  # fmt: skip
        return run_ab_comparison(model, options, out, log=stderr_console().print)

    comparison = run_command(work)
    if json_out:
        emit_json(comparison.to_json())
        return
    Console().print(comparison.table())


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
) -> None:
    """`compare --task refusal`: the STA refusal experiment (`eval sta-refusal`) under `compare`."""
    from finesteer.recipes.compare import slug
    from finesteer.recipes.refusal import markdown_table, refusal_comparison

    def work() -> dict[str, Any]:
        if sae is None:
            raise ValueError(
                "the refusal task steers through an SAE: pass --sae FOLDER (train one with "
                "`finesteer sae train`)"
            )
        folder = out or Path("runs") / f"compare-{slug(model)}-refusal"
        payload = refusal_comparison(
            model, sae, folder, methods=methods, lambdas=lambdas, headline=headline,
            n_harmful=n_harmful, n_harmless=n_harmless, n_pairs=n_pairs, trim=trim,
            max_new_tokens=max_new_tokens, batch_size=batch_size,
        )  # fmt: skip
        stderr_console().print(markdown_table(payload), highlight=False, markup=False)
        return payload

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Refusal steering on {model} (λ = {headline:g})")
    for column in ("method", "refusal rate", "over-refusal rate", "fluency"):
        table.add_column(column)
    for name, row in result["methods"].items():
        table.add_row(
            name, f"{row['refusal_rate']:.2f}", f"{row['over_refusal_rate']:.2f}", f"{row['fluency']:.2f}"
        )
    Console().print(table)
