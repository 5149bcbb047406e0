"""`finesteer fit hsi|iti|caa|sta`: fit an intervention and write an artifact folder.

`fit hsi` and `fit iti` fit on an A/B dataset's `generate` split (`finesteer.recipes.fit_split`):
`--n-val` items choose α, HSI further holds out `--n-sweep` items for the head sweep, and the rest give
the directions; `--test` also scores the `test_ab` split with and without the fitted intervention.
`fit caa` divides the generate split like `compare` does (`finesteer.methods.load_behaviour_data`), so
it fits exactly what `compare` fits. `fit sta` selects SAE atoms from contrast triples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import fit_app
from finesteer.cli.common import (
    check_model_heads,
    emit_json,
    model_shape,
    print_rows,
    run_command,
    show_json,
    stderr_console,
)
from finesteer.cli.options import (
    ABDataOpt,
    AlphasOpt,
    BalanceFormatFlag,
    BatchOpt,
    ColumnsOpt,
    CompletionsOpt,
    DeviceOpt,
    DirectionsFromOpt,
    DtypeOpt,
    GenerateLimitOpt,
    HeadsOpt,
    JsonFlag,
    KOpt,
    ModelArg,
    NSamplesOpt,
    NSweepOpt,
    NValOpt,
    OptionError,
    RankOpt,
    SeedOpt,
    SystemOpt,
    TrainLimitOpt,
    ValFractionOpt,
    ValLimitOpt,
    data_source,
    out_option,
    parse_columns,
    parse_numbers,
)

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


@fit_app.command("hsi")
def fit_hsi_command(
    model: ModelArg,
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    k: KOpt = 4,
    limit: GenerateLimitOpt = None,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    balance_format: BalanceFormatFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Fit HSI (directions, head sweep, top-k + shared α on val) and write an artifact; says whether
    the choice beats random heads on validation (`verdict`)."""
    from finesteer.fit.completions import load_labelled_completions
    from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS, HSIConfig
    from finesteer.fit.hsi_directions import check_directions_from
    from finesteer.methods.hsi import fit_hsi_checked
    from finesteer.recipes.fit_split import fit_on_generate_split
    from finesteer.report.sweep import plot_sweep_folder
    from finesteer.scoring.ab import ABPrompt
    from finesteer.sites import parse_heads

    def work() -> dict[str, Any]:
        grid = parse_numbers(alphas, "--alphas") or DEFAULT_HSI_ALPHAS
        subset = parse_heads(heads) if heads else None
        check_directions_from(directions_from)
        given = load_labelled_completions(completions) if completions is not None else []
        check_model_heads(model, subset)  # the settings are checked before loading
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
            balance_format=balance_format,
        )

        def fit_fn(lm: Any, train: Any, val: Any) -> Any:
            fitted = fit_hsi_checked(
                lm, train, val, config, final_check_tokens=final_check_tokens, completions=given,
                run_dir=run_dir,
            )
            if run_dir is not None:
                plot_sweep_folder(run_dir, rank_by=config.rank_by, top=config.k)
            return fitted

        return fit_on_generate_split(
            "hsi", model, data_source(data, columns, "ab"), fit_fn, out, limit=limit, n_val=n_val, seed=seed,
            test=test, prompt=ABPrompt(system), batch_size=batch_size, say=stderr_console().print,
            device=device, dtype=dtype,
        )  # fmt: skip

    result = run_command(work)
    show_json(result, json_out)


@fit_app.command("iti")
def fit_iti_command(
    model: ModelArg,
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    k: KOpt = 4,
    limit: GenerateLimitOpt = None,
    alphas: AlphasOpt = None,
    n_val: NValOpt = 30,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    out: Annotated[Path, ArtifactOut] = Path("artifacts/iti"),
    run_dir: Annotated[Path | None, typer.Option(help="Run folder for probe scores and heatmap.")] = None,
    test: TestFlag = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    balance_format: BalanceFormatFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Fit the ITI baseline (probe-ranked top-k heads, mass-mean direction, α on val); write an artifact."""
    from finesteer.fit.iti import DEFAULT_ITI_ALPHAS, fit_iti_selection
    from finesteer.methods.verdict import attach_verdict
    from finesteer.recipes.fit_split import fit_on_generate_split
    from finesteer.report.probes import plot_probe_accuracy_folder
    from finesteer.scoring.ab import ABPrompt

    def work() -> dict[str, Any]:
        grid = parse_numbers(alphas, "--alphas") or DEFAULT_ITI_ALPHAS

        def fit_fn(lm: Any, train: Any, val: Any) -> Any:
            fitted, selection = fit_iti_selection(
                lm, train, val, k=k, alphas=grid, run_dir=run_dir, system=system, batch_size=batch_size,
                seed=seed, balance_format=balance_format,
            )  # fmt: skip
            attach_verdict(fitted.metadata, selection.evidence, "ITI selection")
            if run_dir is not None:
                plot_probe_accuracy_folder(run_dir)
            return fitted

        return fit_on_generate_split(
            "iti", model, data_source(data, columns, "ab"), fit_fn, out, limit=limit, n_val=n_val, seed=seed,
            test=test, prompt=ABPrompt(system), batch_size=batch_size, say=stderr_console().print,
            device=device, dtype=dtype,
        )  # fmt: skip

    result = run_command(work)
    show_json(result, json_out)


@fit_app.command("caa")
def fit_caa_command(
    model: ModelArg,
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    out: Annotated[Path, ArtifactOut] = Path("runs/caa"),
    layers: Annotated[
        str | None, typer.Option(help="Layers to sweep, e.g. '8,10,12' (default: all).")
    ] = None,
    multipliers: Annotated[
        str | None, typer.Option(help="Multiplier grid, comma-separated (default 0.5,1,2,5).")
    ] = None,
    direction: Annotated[str, typer.Option(help="'towards' the behaviour or 'away' from it.")] = "towards",
    system: SystemOpt = None,
    train_limit: TrainLimitOpt = None,
    val_limit: ValLimitOpt = None,
    val_fraction: ValFractionOpt = 0.2,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    balance_format: BalanceFormatFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """CAA: residual vectors at the answer letter, layer × multiplier chosen on val; writes an artifact."""
    from finesteer.fit.caa import DEFAULT_MULTIPLIERS, fit_caa_selection
    from finesteer.methods import load_behaviour_data
    from finesteer.methods.verdict import attach_verdict
    from finesteer.models import load_model
    from finesteer.runs import check_writable
    from finesteer.scoring.ab import ABPrompt
    from finesteer.sites import Site

    def work() -> dict[str, Any]:
        grid = parse_numbers(multipliers, "--multipliers") or DEFAULT_MULTIPLIERS
        chosen_layers = parse_numbers(layers, "--layers", int)
        info = model_shape(model)  # --layers and --out checked before loading
        if info is not None and chosen_layers:
            for layer in chosen_layers:
                Site(layer, "resid_post").validate(info)
        check_writable(out)
        behaviour = load_behaviour_data(
            data_source(data, columns, "ab"), val_fraction=val_fraction, train_limit=train_limit,
            val_limit=val_limit, seed=seed,
        )  # fmt: skip
        started = time.perf_counter()
        lm = load_model(model, device=device, dtype=dtype)
        stderr_console().print(
            f"CAA on {model}: vectors from {len(behaviour.train)} items, layer × multiplier sweep on "
            f"{len(behaviour.val)} items"
        )
        fitted, evidence = fit_caa_selection(
            lm,
            list(behaviour.train),
            list(behaviour.val),
            layers=chosen_layers,
            multipliers=grid,
            direction=direction,  # type: ignore[arg-type]
            prompt=ABPrompt(system),
            batch_size=batch_size,
            run_dir=out,
            balance_format=balance_format,
        )
        attach_verdict(fitted.metadata, evidence, "CAA selection")
        fitted.save(out, lm)
        meta = fitted.metadata
        return {
            "verdict": meta["verdict"],
            "selection_verdict": meta["selection_verdict"],
            "direction_diagnostics": meta["direction_diagnostics"],
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


@fit_app.command("sta")
def fit_sta_command(
    model: ModelArg,
    sae: Annotated[Path, typer.Option("--sae", help="SAE folder (SAELens format) at the layer to steer.")],
    out: Annotated[Path, ArtifactOut],
    data: Annotated[
        str,
        typer.Option(
            help="Contrast triples: refusal-pairs (built in), an A/B behaviour (its answers as texts), or a "
            ".jsonl/.csv file with question, matching, not_matching."
        ),
    ] = "refusal-pairs",
    limit: Annotated[int, typer.Option(help="Number of triples.")] = 160,
    mode: Annotated[
        str, typer.Option(help="sta (amplitude and frequency), amplitude, frequency, or all (SAE-AxBench).")
    ] = "sta",
    trim: Annotated[float, typer.Option(help="Top fraction of atoms kept by each criterion.")] = 0.35,
    multiplier: Annotated[float, typer.Option("--lambda", help="Multiplier λ of the CAA-norm vector.")] = 1.0,
    run_dir: Annotated[Path | None, typer.Option(help="Where to keep atom statistics and sta.json.")] = None,
    columns: ColumnsOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Fit Steering Target Atoms: select atoms, decode, match the CAA norm, write an artifact."""
    from finesteer.fit.sta import SELECTION_MODES, answer_pairs, fit_sta
    from finesteer.methods.data import load_triples
    from finesteer.models import load_model
    from finesteer.sae import load_sae

    def work() -> dict[str, object]:
        if mode not in SELECTION_MODES:
            raise OptionError(f"unknown --mode {mode!r}; choose {', '.join(SELECTION_MODES)}")
        if limit < 1:
            raise OptionError("--limit must be ≥ 1")
        triples = load_triples(data, limit, parse_columns(columns))  # checked before any load
        if not triples:
            raise OptionError(f"--data {data!r} gave no triples")
        loaded = load_sae(sae)
        lm = load_model(model, device=device, dtype=dtype)
        stderr_console().print(f"STA ({mode}) on {len(triples)} triples at {loaded.cfg.hook_name}")
        fitted = fit_sta(
            lm,
            loaded,
            answer_pairs(lm.tokenizer, triples),
            trim=trim,
            multiplier=multiplier,
            mode=mode,  # type: ignore[arg-type]
            run_dir=run_dir,
            sae_path=str(sae),
        )
        fitted.metadata["data"] = data
        fitted.save(out, lm)
        return {"artifact": str(out), **fitted.metadata}

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    rows = [(k, v) for k, v in result.items() if k != "top_atoms"]
    print_rows(f"STA artifact {out}", rows, ".4g")


