"""HSI and ITI commands: `locate hsi`, `locate iti`, `fit hsi`, `fit iti`.

All four read an A/B dataset's `generate` split (first `--limit` items) and split it with a seeded
shuffle: `fit` holds out `--n-val` items to choose α, HSI further holds out `--n-sweep` items for
the head sweep, and the rest give the directions. `--test` also scores the dataset's `test_ab`
split (letter probability) with and without the fitted intervention.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import fit_app, locate_app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.cli.options import (
    BatchOpt,
    JsonFlag,
    ModelArg,
    SeedOpt,
    SystemOpt,
    out_option,
    parse_numbers,
)
from finesteer.runs import RUN_JSON, write_json_atomic

DataOpt = Annotated[str, typer.Option("--data", help="A/B dataset, e.g. coordinate-other-ais, sycophancy.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use the first N items of the generate split.")]
AlphasOpt = Annotated[
    str | None,
    typer.Option(help="α grid in units of σ, comma-separated (negative = steer away; write --alphas=-2,-4)."),
]
NSweepOpt = Annotated[int, typer.Option(help="Training items held out for the head sweep (HSI).")]
NValOpt = Annotated[int, typer.Option(help="Items held out to choose α (fit) / rank probes (ITI).")]
HeadsOpt = Annotated[str | None, typer.Option(help="Only sweep these heads, e.g. '12.3,13.1'.")]
KOpt = Annotated[int, typer.Option("--k", help="Number of heads to steer.")]
RankOpt = Annotated[
    str,
    typer.Option(
        help="Head ranking: 'balanced' (worst matching-letter group's gain, best α), 'max' (plain mean "
        "gain, best α) or 'mean' (plain gain averaged over α)."
    ),
]
DirectionsFromOpt = Annotated[
    str,
    typer.Option(
        help="Read HSI directions from 'ab' (both answer letters after each prompt), 'sampled' (the "
        "model's own sampled answers, labelled by the option they name: the paper's recipe), 'both', "
        "or 'given' (only --completions)."
    ),
]
CompletionsOpt = Annotated[
    Path | None,
    typer.Option(help="JSONL of labelled completions {prompt, completion, label} added to the directions."),
]
NSamplesOpt = Annotated[
    int, typer.Option(help="Sampled answers per training item (--directions-from sampled).")
]
FinalCheckOpt = Annotated[
    int,
    typer.Option(
        help="Final check: answer the validation items by generating this many tokens, with and "
        "without the chosen edit (0 = skip)."
    ),
]
TestFlag = Annotated[
    bool, typer.Option("--test", help="Also score the test_ab split with and without the intervention.")
]
ArtifactOut = out_option("Artifact folder to write.")

GENERATE_SPLIT = "generate"


def _write_run(out: Path, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_JSON, payload, indent=1)


@locate_app.command("hsi")
def locate_hsi(
    model: ModelArg,
    data: DataOpt = "coordinate-other-ais",
    limit: LimitOpt = None,
    alphas: AlphasOpt = None,
    n_sweep: NSweepOpt = 24,
    heads: HeadsOpt = None,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    rank_by: RankOpt = "balanced",
    directions_from: DirectionsFromOpt = "ab",
    completions: CompletionsOpt = None,
    n_samples: NSamplesOpt = 2,
    seed: SeedOpt = 0,
    out: Annotated[Path, out_option("Run folder (rerun the same command to resume).")] = Path("runs/hsi"),
    json_out: JsonFlag = False,
) -> None:
    """Sweep single-head steering over an α grid; writes a layer × head × α table, scores and heatmaps."""
    from finesteer.data.typed import load_ab_set
    from finesteer.fit.completions import load_labelled_completions
    from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS
    from finesteer.fit.hsi_directions import check_directions_from
    from finesteer.fit.hsi_sweep import sweep_hsi_heads
    from finesteer.locate.hsi_table import check_alphas
    from finesteer.models import load_model
    from finesteer.report.sweep import plot_sweep
    from finesteer.scoring.ab import ABPrompt
    from finesteer.sites import parse_heads

    def work() -> dict[str, Any]:
        grid = check_alphas(parse_numbers(alphas, "--alphas") or DEFAULT_HSI_ALPHAS)
        subset = parse_heads(heads) if heads else None
        check_directions_from(directions_from)
        items = load_ab_set(data, GENERATE_SPLIT, limit)
        given = load_labelled_completions(completions) if completions is not None else []
        started = time.perf_counter()
        lm = load_model(model)
        run = sweep_hsi_heads(
            lm,
            items,
            grid,
            n_sweep=n_sweep,
            seed=seed,
            heads=subset,
            directions_from=directions_from,
            completions=given,
            n_samples=n_samples,
            prompt=ABPrompt(system),
            batch_size=batch_size,
            rank_by=rank_by,  # type: ignore[arg-type]
            run_dir=out,
        )
        plots = plot_sweep(run.sweep, out, rank_by=rank_by)  # type: ignore[arg-type]
        result = {
            "model": model,
            "data": data,
            "out": str(out),
            **run.sweep.summary(top=10, rank_by=rank_by),  # type: ignore[arg-type]
            "resumed_layers": run.sweep.meta.get("resumed_layers", []),
            "n_direction_items": run.n_direction_items,
            **run.source,
            "plots": [str(p) for p in plots],
            "seconds": round(time.perf_counter() - started, 1),
        }
        _write_run(out, {"command": "locate hsi", **result})
        return result

    result = run_command(work)
    _print(result, json_out)


@locate_app.command("iti")
def locate_iti(
    model: ModelArg,
    data: DataOpt = "coordinate-other-ais",
    limit: LimitOpt = None,
    n_val: NValOpt = 30,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    out: Annotated[Path, out_option("Run folder.")] = Path("runs/iti"),
    json_out: JsonFlag = False,
) -> None:
    """Train one logistic probe per head (train items) and rank heads by val accuracy."""
    from finesteer.data.typed import load_ab_set
    from finesteer.fit.hsi import split_items
    from finesteer.fit.iti import probe_items
    from finesteer.models import load_model
    from finesteer.report.heatmap import plot_head_heatmap

    def work() -> dict[str, Any]:
        items = load_ab_set(data, GENERATE_SPLIT, limit)
        started = time.perf_counter()
        lm = load_model(model)
        train, val = split_items(items, n_val, seed)
        stderr_console().print(f"ITI probes on {model}: train {len(train)} items, val {len(val)}")
        probes, z, _ = probe_items(
            lm, train, val, system=system, batch_size=batch_size, seed=seed, progress=True
        )
        table = probes.head_scores(model_name=lm.name, model_fingerprint=lm.fingerprint, n_prompts=len(z))
        table.save(out / "head_scores")
        plot = plot_head_heatmap(table, out / "iti_val_accuracy.png", label="probe val accuracy")
        result = {
            "model": model,
            "data": data,
            "out": str(out),
            "n_train_items": len(train),
            "n_val_items": len(val),
            "top": [
                {
                    "layer": layer,
                    "head": h,
                    "val_accuracy": float(probes.val_accuracy[layer, h]),
                    "train_accuracy": float(probes.train_accuracy[layer, h]),
                }
                for layer, h in probes.top_heads(10)
            ],
            "plots": [str(plot)],
            "seconds": round(time.perf_counter() - started, 1),
        }
        _write_run(out, {"command": "locate iti", **result})
        return result

    result = run_command(work)
    _print(result, json_out)


def _fit(
    method: str,
    model: str,
    data: str,
    limit: int | None,
    n_val: int,
    seed: int,
    out: Path,
    test: bool,
    batch_size: int,
    system: str | None,
    fit_fn: Any,
) -> dict[str, Any]:
    from finesteer.data.typed import load_ab_set
    from finesteer.evaluate.ab_effect import ab_effect
    from finesteer.fit.hsi import split_items
    from finesteer.models import load_model
    from finesteer.scoring.ab import ABPrompt

    items = load_ab_set(data, GENERATE_SPLIT, limit)
    started = time.perf_counter()
    lm = load_model(model)
    train, val = split_items(items, n_val, seed)
    stderr_console().print(
        f"fitting {method} on {model}/{data}: {len(train)} train items, {len(val)} val items"
    )
    fitted = fit_fn(lm, train, val)
    fit_seconds = time.perf_counter() - started
    metadata = {**fitted.metadata, "data": data, "limit": limit, "split_seed": seed}
    result: dict[str, Any] = {
        "method": method,
        "model": model,
        "data": data,
        "artifact": str(out),
        "heads": metadata["heads"],
        "alpha": metadata["alpha"],
        "selection": metadata["selection"],
        "fit_seconds": round(fit_seconds, 1),
    }
    if metadata.get("final_check") is not None:
        result["final_check"] = metadata["final_check"]
    if test:
        stderr_console().print("scoring the test_ab split")
        test_items = load_ab_set(data, "test_ab")
        prompt = ABPrompt(system)
        result["test"] = ab_effect(lm, test_items, fitted.intervention, prompt=prompt, batch_size=batch_size)
        metadata["test"] = result["test"]
    fitted.metadata.update(metadata)
    fitted.save(out, lm)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


@fit_app.command("hsi")
def fit_hsi_command(
    model: ModelArg,
    data: DataOpt = "coordinate-other-ais",
    k: KOpt = 4,
    limit: LimitOpt = None,
    alphas: AlphasOpt = None,
    n_sweep: NSweepOpt = 24,
    n_val: NValOpt = 30,
    heads: HeadsOpt = None,
    rank_by: RankOpt = "balanced",
    directions_from: DirectionsFromOpt = "ab",
    completions: CompletionsOpt = None,
    n_samples: NSamplesOpt = 2,
    final_check_tokens: FinalCheckOpt = 32,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    out: Annotated[Path, ArtifactOut] = Path("artifacts/hsi"),
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run folder for directions, sweep checkpoints and heatmaps (resumable)."),
    ] = None,
    test: TestFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Fit HSI (directions, head sweep, top-k + shared α on val) and write an artifact."""
    from finesteer.fit.completions import load_labelled_completions
    from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS, HSIConfig
    from finesteer.fit.hsi_directions import check_directions_from
    from finesteer.methods.hsi import fit_hsi_checked
    from finesteer.report.sweep import plot_sweep_folder
    from finesteer.scoring.ab import ABPrompt
    from finesteer.sites import parse_heads

    def work() -> dict[str, Any]:
        grid = parse_numbers(alphas, "--alphas") or DEFAULT_HSI_ALPHAS
        subset = parse_heads(heads) if heads else None
        check_directions_from(directions_from)
        given = load_labelled_completions(completions) if completions is not None else []

        def fit_fn(lm: Any, train: Any, val: Any) -> Any:
            config = HSIConfig(
                k=k,
                alphas=tuple(grid),
                heads_subset=tuple(subset) if subset is not None else None,
                n_sweep=n_sweep,
                rank_by=rank_by,  # type: ignore[arg-type]
                prompt=ABPrompt(system),
                batch_size=batch_size,
                seed=seed,
                directions_from=directions_from,  # type: ignore[arg-type]
                n_samples=n_samples,
            )
            fitted = fit_hsi_checked(
                lm, train, val, config, final_check_tokens=final_check_tokens, completions=given,
                run_dir=run_dir,
            )
            if run_dir is not None:
                plot_sweep_folder(run_dir, rank_by=config.rank_by, top=config.k)
            return fitted

        return _fit("hsi", model, data, limit, n_val, seed, out, test, batch_size, system, fit_fn)

    result = run_command(work)
    _print(result, json_out)


@fit_app.command("iti")
def fit_iti_command(
    model: ModelArg,
    data: DataOpt = "coordinate-other-ais",
    k: KOpt = 4,
    limit: LimitOpt = None,
    alphas: AlphasOpt = None,
    n_val: NValOpt = 30,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    out: Annotated[Path, ArtifactOut] = Path("artifacts/iti"),
    run_dir: Annotated[Path | None, typer.Option(help="Run folder for probe scores and heatmap.")] = None,
    test: TestFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Fit the ITI baseline (probe-ranked top-k heads, mass-mean direction, α on val); write an artifact."""
    from finesteer.fit.iti import DEFAULT_ITI_ALPHAS, fit_iti
    from finesteer.report.probes import plot_probe_accuracy_folder

    def work() -> dict[str, Any]:
        grid = parse_numbers(alphas, "--alphas") or DEFAULT_ITI_ALPHAS

        def fit_fn(lm: Any, train: Any, val: Any) -> Any:
            fitted = fit_iti(
                lm,
                train,
                val,
                k=k,
                alphas=grid,
                run_dir=run_dir,
                system=system,
                batch_size=batch_size,
                seed=seed,
            )
            if run_dir is not None:
                plot_probe_accuracy_folder(run_dir)
            return fitted

        return _fit("iti", model, data, limit, n_val, seed, out, test, batch_size, system, fit_fn)

    result = run_command(work)
    _print(result, json_out)


def _print(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(result)
        return
    from rich.console import Console

    Console().print_json(json.dumps(result, default=str))
