"""`finesteer locate ships|sahara|hsi|iti`: score every head for a behaviour.

Ships, Sahara and attribution ablate heads on a prompt set (run folder: `finesteer.locate.run_folder`);
`locate hsi` sweeps single-head steering and `locate iti` probes every head on an A/B `generate` split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import locate_app
from finesteer.cli.common import check_model_heads, run_command, show, show_json, stderr_console
from finesteer.cli.options import (
    ABDataOpt,
    ActorsOpt,
    AlphasOpt,
    BackendOpt,
    BalanceFormatFlag,
    BatchOpt,
    ColumnsOpt,
    CompletionsOpt,
    DeviceOpt,
    DirectionsFromOpt,
    DtypeOpt,
    EngineOpt,
    EpsOpt,
    GenerateLimitOpt,
    HeadsOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    ModeOpt,
    NSamplesOpt,
    NSweepOpt,
    NumCpusOpt,
    NumGpusOpt,
    NValOpt,
    OutOpt,
    PromptDataOpt,
    RankOpt,
    RayAddressOpt,
    ResumeOpt,
    SeedOpt,
    SplitOpt,
    SystemOpt,
    TemplateOpt,
    check_choice,
    data_source,
    head_names,
    out_option,
    parse_numbers,
    slug,
)

LEVELS = ("query", "dataset", "both")


def scan_prompts(
    model: str, data: str, split: str | None, limit: int | None, template: str, folder: Path | None = None,
    device: str = "cpu", dtype: str = "float32",
) -> tuple[Any, list[str], list[str], list[str]]:
    """The model and the formatted prompts of a head-ablation scan (`prompts.jsonl` written to `folder`)."""
    from finesteer.data.typed import load_queries
    from finesteer.locate.run_folder import write_prompts
    from finesteer.locate.ships import format_queries
    from finesteer.models import load_model

    queries, ids = load_queries(data, split, limit)
    lm = load_model(model, device=device, dtype=dtype)
    prompts = format_queries(lm, queries, template)
    if folder is not None:
        write_prompts(folder, queries, ids)
    return lm, queries, ids, prompts


@locate_app.command("ships")
def ships(
    model: ModelArg,
    data: PromptDataOpt,
    columns: ColumnsOpt = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    level: Annotated[
        str, typer.Option(help="query (next-token KL), dataset (principal angles), or both from one scan "
                          "(then written to OUT/query and OUT/dataset).")
    ] = "query",
    r_main: Annotated[int, typer.Option(help="Principal angles summed (dataset level).")] = 1,
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = 2,
    num_cpus: NumCpusOpt = 1.0,
    num_gpus: NumGpusOpt = 0.0,
    json_out: JsonFlag = False,
) -> None:
    """Score every head by how much ablating it changes the model's response to harmful prompts."""

    def work() -> dict[str, Any]:
        from finesteer.cli.plans import backend_options, open_backend
        from finesteer.locate import run_folder
        from finesteer.locate import ships as ships_lib
        from finesteer.locate.ships_plan import run_ships_plan
        from finesteer.report.heatmap import plot_head_heatmap
        from finesteer.runs.records import JsonlRecords

        check_choice(level, LEVELS, "--level")
        where = backend_options(backend, ray_address, actors, num_cpus, num_gpus)
        ships_lib.check_scan_settings(  # every check that needs no weights, before loading
            mode=mode, eps=eps, template=template, batch_size=batch_size, r_main=r_main)  # fmt: skip
        folder = out or Path("runs") / slug("ships", model, data, mode, level)
        with run_folder.writing(folder, resume) as checkpoint:  # locked until saved
            source = data_source(data, columns, "prompts")
            lm, queries, ids, prompts = scan_prompts(model, source, split, limit, template, folder, device,
                                                     dtype)  # fmt: skip
            levels = ("query", "dataset") if level == "both" else (level,)
            n_heads, what = lm.info.n_layers * lm.info.n_heads, f"Ships {'+'.join(levels)} ({mode}, ε={eps})"
            stderr_console().print(f"{what}: {len(prompts)} prompts × {n_heads} heads of {model}")
            started = time.perf_counter()
            with open_backend(where, model, lm, device=device, dtype=dtype) as runner:
                tables = run_ships_plan(
                    lm, prompts, levels=levels, mode=mode, eps=eps, r_main=r_main, batch_size=batch_size,
                    engine=engine, backend=runner, store=JsonlRecords(checkpoint / "jobs.jsonl"),
                )  # fmt: skip
            seconds = round(time.perf_counter() - started, 1)
            info = {
                "command": "locate ships", "model": model, "data": data, "split": split, "limit": limit,
                "n_prompts": len(prompts), "mode": mode, "eps": eps, "template": template, "seconds": seconds,
                "backend": backend,
            }  # fmt: skip
            combined = level == "both"
            payload = run_folder.save_ships(
                folder, tables, info, queries, ids, lm.info.n_heads, r_main=r_main, combined=combined
            )
            for name, scores in tables.items():
                heatmap = run_folder.level_folder(folder, name, combined) / run_folder.HEATMAP_FILE
                plot_head_heatmap(scores, heatmap, title=f"Ships {name} {mode} · {model} · {data}")
            return payload

    result = run_command(work)
    show(result, json_out)


@locate_app.command("sahara")
def sahara(
    model: ModelArg,
    data: PromptDataOpt,
    columns: ColumnsOpt = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    group_size: Annotated[int, typer.Option(help="Heads in the group.")] = 3,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    r_main: Annotated[int, typer.Option(help="Principal angles summed.")] = 1,
    candidates_from: Annotated[
        Path | None, typer.Option(help="Search only the top --top-n heads of this scores folder.")
    ] = None,
    top_n: Annotated[int, typer.Option(help="Candidates kept from --candidates-from.")] = 32,
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Greedily find the head group whose joint ablation moves the safety subspace most."""

    def work() -> dict[str, Any]:
        from finesteer.locate import run_folder
        from finesteer.locate.sahara import check_sahara_settings
        from finesteer.locate.sahara import sahara as run_sahara
        from finesteer.locate.scores import HeadScores
        from finesteer.models import peek_model_info
        from finesteer.report.heatmap import plot_head_heatmap

        candidates = HeadScores.load(candidates_from).top_heads(top_n) if candidates_from else None
        check_sahara_settings(peek_model_info(model), group_size=group_size, candidates=candidates, mode=mode,
                              eps=eps, template=template, batch_size=batch_size, r_main=r_main)  # fmt: skip
        folder = out or Path("runs") / slug("sahara", model, data, mode)
        with run_folder.writing(folder, resume) as checkpoint:  # locked until saved
            source = data_source(data, columns, "prompts")
            lm, _, _, prompts = scan_prompts(model, source, split, limit, template, folder, device,
                                             dtype)  # fmt: skip
            started = time.perf_counter()
            result = run_sahara(
                lm, prompts, group_size=group_size, mode=mode, eps=eps, r_main=r_main, candidates=candidates,
                batch_size=batch_size, checkpoint=checkpoint, engine=engine,
            )  # fmt: skip
            seconds = round(time.perf_counter() - started, 1)
            sahara_file = run_folder.write_sahara(folder, result)
            first = result.step_scores(lm, 0)
            first.extra.update(data=data, split=split, limit=limit, template=template)
            first.save(folder)
            plot_head_heatmap(first, folder / "heatmap.png", title=f"Sahara step 1 {mode} · {model} · {data}")
            payload = {
                "command": "locate sahara", "model": model, "data": data, "split": split,
                "n_prompts": len(prompts), "mode": mode, "eps": eps, "r_main": r_main, "template": template,
                "group": head_names(result.group), "step_scores": [s.score for s in result.steps],
                "seconds": seconds, "out": str(folder), "sahara_json": str(sahara_file),
                "heatmap": str(folder / "heatmap.png"),
            }  # fmt: skip
            run_folder.write_run(folder, payload)
            return payload

    result = run_command(work)
    show(result, json_out)


@locate_app.command("hsi")
def locate_hsi(
    model: ModelArg,
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    limit: GenerateLimitOpt = None,
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
    balance_format: BalanceFormatFlag = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = 2,
    num_cpus: NumCpusOpt = 1.0,
    num_gpus: NumGpusOpt = 0.0,
    json_out: JsonFlag = False,
) -> None:
    """Sweep single-head steering over an α grid; writes a layer × head × α table, scores and heatmaps,
    each top head's direction diagnostics and the sweep's verdict (both option orders)."""
    from finesteer.cli.plans import backend_options, open_backend
    from finesteer.fit.completions import load_labelled_completions
    from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS
    from finesteer.fit.hsi_directions import check_directions_from
    from finesteer.locate.hsi_table import check_alphas
    from finesteer.recipes.head_sweep import locate_hsi as run_locate_hsi
    from finesteer.sites import parse_heads

    def work() -> dict[str, Any]:
        grid = check_alphas(parse_numbers(alphas, "--alphas") or DEFAULT_HSI_ALPHAS)
        check_model_heads(model, subset := parse_heads(heads) if heads else None)  # before loading
        check_directions_from(directions_from)
        where = backend_options(backend, ray_address, actors, num_cpus, num_gpus)
        given = load_labelled_completions(completions) if completions is not None else []
        return run_locate_hsi(
            model, data_source(data, columns, "ab"), grid, out, limit=limit, n_sweep=n_sweep, heads=subset,
            system=system, batch_size=batch_size, rank_by=rank_by, directions_from=directions_from,  # type: ignore[arg-type]
            completions=given, n_samples=n_samples, seed=seed, balance_format=balance_format,
            device=device, dtype=dtype,
            backend=lambda lm: open_backend(where, model, lm, device=device, dtype=dtype),
        )  # fmt: skip

    result = run_command(work)
    show_json(result, json_out)


@locate_app.command("iti")
def locate_iti(
    model: ModelArg,
    data: ABDataOpt = "coordinate-other-ais",
    columns: ColumnsOpt = None,
    limit: GenerateLimitOpt = None,
    n_val: NValOpt = 30,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    out: Annotated[Path, out_option("Run folder.")] = Path("runs/iti"),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Train one logistic probe per head (train items, both option orders) and rank heads by val accuracy."""
    from finesteer.recipes.head_sweep import locate_iti as run_locate_iti

    def work() -> dict[str, Any]:
        return run_locate_iti(
            model, data_source(data, columns, "ab"), out, limit=limit, n_val=n_val, system=system,
            batch_size=batch_size, seed=seed, say=stderr_console().print, device=device, dtype=dtype,
        )

    result = run_command(work)
    show_json(result, json_out)
