"""Safety-head commands: `locate ships`, `locate sahara`, `locate overlap`, `ablate`, `export-surgery`.

The run folder they write and read is defined in `finesteer.locate.run_folder`; `ablate` is
`finesteer.evaluate.ablation`. Each command parses its options, calls the library and prints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app, locate_app
from finesteer.cli.common import emit_json, run_command, show, stderr_console
from finesteer.cli.options import (
    BatchOpt,
    EngineOpt,
    EpsOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    ModeOpt,
    PromptDataOpt,
    SplitOpt,
    TemplateOpt,
    check_choice,
    out_option,
    parse_numbers,
    slug,
)

OutOpt = Annotated[Path | None, out_option("Run folder (default: runs/<command>-<model>-…).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a checkpointed run in --out.")]
LEVELS = ("query", "dataset", "both")


@locate_app.command("ships")
def ships(
    model: ModelArg,
    data: PromptDataOpt,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    level: Annotated[
        str,
        typer.Option(
            help="query (next-token KL), dataset (principal angles), or both from one scan "
            "(then written to OUT/query and OUT/dataset)."
        ),
    ] = "query",
    r_main: Annotated[int, typer.Option(help="Principal angles summed (dataset level).")] = 1,
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: OutOpt = None,
    resume: ResumeOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Score every head by how much ablating it changes the model's response to harmful prompts."""

    def work() -> dict[str, Any]:
        from finesteer.data.typed import load_queries
        from finesteer.locate import run_folder
        from finesteer.locate import ships as ships_lib
        from finesteer.models import load_model
        from finesteer.report.heatmap import plot_head_heatmap

        check_choice(level, LEVELS, "--level")
        ships_lib.ablation_method(mode)
        folder = out or Path("runs") / slug("ships", model, data, mode, level)
        checkpoint = run_folder.prepare(folder, resume)
        queries, ids = load_queries(data, split, limit)
        lm = load_model(model)
        prompts = ships_lib.format_queries(lm, queries, template)
        run_folder.write_prompts(folder, queries, ids)
        levels = ("query", "dataset") if level == "both" else (level,)
        n_heads = lm.info.n_layers * lm.info.n_heads
        stderr_console().print(
            f"Ships {'+'.join(levels)} ({mode}, ε={eps}): {len(prompts)} prompts × {n_heads} heads of {model}"
        )
        started = time.perf_counter()
        tables = ships_lib.ships_scores(
            lm,
            prompts,
            levels=levels,
            mode=mode,
            eps=eps,
            r_main=r_main,
            batch_size=batch_size,
            checkpoint=checkpoint,
            engine=engine,
        )
        seconds = round(time.perf_counter() - started, 1)
        info = {
            "command": "locate ships",
            "model": model,
            "data": data,
            "split": split,
            "limit": limit,
            "n_prompts": len(prompts),
            "mode": mode,
            "eps": eps,
            "template": template,
            "seconds": seconds,
        }
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
    json_out: JsonFlag = False,
) -> None:
    """Greedily find the head group whose joint ablation moves the safety subspace most."""

    def work() -> dict[str, Any]:
        from finesteer.data.typed import load_queries
        from finesteer.locate import run_folder
        from finesteer.locate import ships as ships_lib
        from finesteer.locate.sahara import sahara as run_sahara
        from finesteer.locate.scores import HeadScores
        from finesteer.models import load_model
        from finesteer.report.heatmap import plot_head_heatmap

        ships_lib.ablation_method(mode)
        folder = out or Path("runs") / slug("sahara", model, data, mode)
        checkpoint = run_folder.prepare(folder, resume)
        candidates = HeadScores.load(candidates_from).top_heads(top_n) if candidates_from else None
        queries, ids = load_queries(data, split, limit)
        lm = load_model(model)
        prompts = ships_lib.format_queries(lm, queries, template)
        run_folder.write_prompts(folder, queries, ids)
        started = time.perf_counter()
        result = run_sahara(
            lm,
            prompts,
            group_size=group_size,
            mode=mode,
            eps=eps,
            r_main=r_main,
            candidates=candidates,
            batch_size=batch_size,
            checkpoint=checkpoint,
            engine=engine,
        )
        seconds = round(time.perf_counter() - started, 1)
        sahara_file = run_folder.write_sahara(folder, result)
        first = result.step_scores(lm, 0)
        first.extra.update(data=data, split=split, limit=limit, template=template)
        first.save(folder)
        plot_head_heatmap(first, folder / "heatmap.png", title=f"Sahara step 1 {mode} · {model} · {data}")
        payload = {
            "command": "locate sahara",
            "model": model,
            "data": data,
            "split": split,
            "n_prompts": len(prompts),
            "mode": mode,
            "eps": eps,
            "r_main": r_main,
            "template": template,
            "group": [f"{layer}.{head}" for layer, head in result.group],
            "step_scores": [s.score for s in result.steps],
            "seconds": seconds,
            "out": str(folder),
            "sahara_json": str(sahara_file),
            "heatmap": str(folder / "heatmap.png"),
        }
        run_folder.write_run(folder, payload)
        return payload

    result = run_command(work)
    show(result, json_out)


@app.command("ablate")
def ablate(
    model: ModelArg,
    data: PromptDataOpt,
    heads: Annotated[str | None, typer.Option(help="Ranked heads LAYER.HEAD,… (best first).")] = None,
    from_run: Annotated[
        Path | None, typer.Option(help="Take the ranked heads (or Sahara group) from this run folder.")
    ] = None,
    eval_kind: Annotated[str, typer.Option("--eval", help="What to measure: asr.")] = "asr",
    split: SplitOpt = None,
    limit: LimitOpt = None,
    ks: Annotated[str | None, typer.Option(help="Head counts to ablate, e.g. 1,2,3 (default 1..5).")] = None,
    mode: Annotated[str | None, typer.Option(help="ua or sc (default: the run's mode, else ua).")] = None,
    eps: Annotated[
        float | None, typer.Option(help="Ablation factor ε (default: the run's, else 1e-5).")
    ] = None,
    random_seeds: Annotated[int, typer.Option(help="Random-head control sets per k.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt (greedy).")] = 64,
    harmless: Annotated[
        str | None, typer.Option(help="Harmless dataset for helpfulness ('none' to skip).")
    ] = "jailbreakbench-benign",
    harmless_limit: Annotated[int | None, typer.Option(help="Harmless prompts (default: --limit).")] = None,
    helpfulness_ks: Annotated[
        str | None, typer.Option(help="Head counts whose helpfulness is measured (default: all --ks).")
    ] = None,
    mc: Annotated[
        str, typer.Option(help="Multiple-choice set for helpfulness accuracy ('none' to skip).")
    ] = "finesteer-mc",
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Ablate the top-k heads and measure ASR against the unmodified model and random heads."""

    def work() -> dict[str, Any]:
        from finesteer.evaluate.ablation import AblationSetup, plan_ablation, run_ablation
        from finesteer.models import load_model

        setup = AblationSetup(
            data=data,
            heads=heads,
            from_run=from_run,
            eval_kind=eval_kind,
            split=split,
            limit=limit,
            ks=parse_numbers(ks, "--ks", int),
            mode=mode,
            eps=eps,
            random_seeds=random_seeds,
            max_new_tokens=max_new_tokens,
            harmless=harmless,
            harmless_limit=harmless_limit,
            helpfulness_ks=parse_numbers(helpfulness_ks, "--helpfulness-ks", int),
            mc=mc,
            template=template,
            batch_size=batch_size,
        )
        plan = plan_ablation(setup)
        lm = load_model(model)
        folder = out or from_run or Path("runs") / slug("ablate", model, data, plan.mode)
        summary = run_ablation(lm, plan, folder, resume=resume)
        return {"command": "ablate", "model": model, **summary}

    result = run_command(work)
    show(result, json_out)


@app.command("export-surgery")
def export_surgery(
    model: ModelArg,
    heads: Annotated[str, typer.Option(help="Heads to ablate, LAYER.HEAD,…")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the exported HF model (must be empty).")],
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    verify: Annotated[
        bool, typer.Option(help="Reload with plain transformers and compare logits with the hooked model.")
    ] = True,
    json_out: JsonFlag = False,
) -> None:
    """Export a copy of the model with the head ablation baked into its weights (plain HF folder)."""

    def work() -> dict[str, Any]:
        from finesteer.models import load_model
        from finesteer.sites import parse_heads
        from finesteer.surgery import export_surgery as run_export
        from finesteer.surgery import verify_export

        lm = load_model(model)
        head_list = parse_heads(heads)
        folder = run_export(lm, head_list, out, mode=mode, eps=eps)
        result: dict[str, Any] = {
            "command": "export-surgery",
            "model": model,
            "heads": [f"{layer}.{head}" for layer, head in head_list],
            "mode": mode,
            "eps": eps,
            "out": str(folder),
        }
        if verify:
            result["verify"] = verify_export(lm, head_list, folder, mode=mode, eps=eps)
        return result

    result = run_command(work)
    show(result, json_out)


@locate_app.command("overlap")
def overlap_command(
    first: Annotated[Path, typer.Argument(help="Scores folder (or a run folder holding one).")],
    second: Annotated[Path, typer.Argument(help="The other scores folder or run folder.")],
    k: Annotated[int, typer.Option(help="How many top heads to compare.")] = 10,
    json_out: JsonFlag = False,
) -> None:
    """How much two head tables agree: top-k Jaccard, shared heads and Spearman over all heads.

    For two methods or modes on one model, or two checkpoints of one architecture (e.g. a base and a
    fine-tuned model); tables of different shapes are refused.
    """

    def work() -> dict[str, Any]:
        from finesteer.locate.rank_stats import spearman
        from finesteer.locate.run_folder import scores_folder
        from finesteer.locate.scores import HeadScores, jaccard_top_k

        a, b = (HeadScores.load(scores_folder(p)) for p in (first, second))
        jaccard = jaccard_top_k(a, b, k)
        shared = sorted(set(a.top_heads(k)) & set(b.top_heads(k)))
        return {
            "first": {"path": str(first), "model": a.model_name, "method": a.method, "mode": a.mode},
            "second": {"path": str(second), "model": b.model_name, "method": b.method, "mode": b.mode},
            "k": k,
            "jaccard": jaccard,
            "shared": [f"{layer}.{head}" for layer, head in shared],
            "spearman": spearman(a.scores.flatten(), b.scores.flatten()),
            "top_first": [f"{layer}.{head}" for layer, head in a.top_heads(k)],
            "top_second": [f"{layer}.{head}" for layer, head in b.top_heads(k)],
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    stderr_console().print(
        f"top-{k} Jaccard {result['jaccard']:.2f} ({len(result['shared'])} shared: "
        f"{', '.join(result['shared']) or 'none'}); Spearman over all heads {result['spearman']:.2f}"
    )
