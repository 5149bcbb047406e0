"""`finesteer ablate` (top-k head ablation against random heads) and `finesteer export-surgery`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import model_shape, output_folder, run_command, show
from finesteer.cli.options import (
    BatchOpt,
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    EpsOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    ModeOpt,
    OutOpt,
    PromptDataOpt,
    ResumeOpt,
    SplitOpt,
    TemplateOpt,
    data_source,
    head_names,
    parse_numbers,
    slug,
)


@app.command("ablate")
def ablate(
    model: ModelArg,
    data: PromptDataOpt,
    columns: ColumnsOpt = None,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Ablate the top-k heads and measure ASR against the unmodified model and random heads."""

    def work() -> dict[str, Any]:
        from finesteer.evaluate.ablation import AblationSetup, check_plan, plan_ablation, run_ablation
        from finesteer.models import load_model

        setup = AblationSetup(
            data=data_source(data, columns, "prompts"),
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
        check_plan(plan, model_shape(model))  # heads, ε, counts: before loading
        folder = out or from_run or Path("runs") / slug("ablate", model, data, plan.mode)
        with output_folder(folder):  # checked, locked and held until the results are written
            summary = run_ablation(load_model(model, device=device, dtype=dtype), plan, folder, resume=resume)
        return {"command": "ablate", "model": model, **summary}

    result = run_command(work)
    show(result, json_out)
    if not json_out and result.get("effects"):
        _print_effects(result)


def _print_effects(result: dict[str, Any]) -> None:
    """The ablation table: ASR with its 95% interval, random heads, paired lifts and the verdict per k."""
    from rich.console import Console
    from rich.table import Table

    from finesteer.evaluate.asr_paired import ablation_table

    columns, rows = ablation_table(result["effects"], result["random_asr_mean"], result["random_asr_std"])
    table = Table(title=f"ASR on {result['n_prompts']} held-out prompts, {result['mode']} ablation")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console() if Console().is_terminal else Console(width=160)  # a log file: no wrapping
    console.print(table)


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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Export a copy of the model with the head ablation baked into its weights (plain HF folder)."""

    def work() -> dict[str, Any]:
        from finesteer.interventions import check_eps
        from finesteer.models import load_model, peek_model_info
        from finesteer.runs.lock import check_writable
        from finesteer.sites import check_heads, parse_heads
        from finesteer.surgery import export_surgery as run_export
        from finesteer.surgery import verify_export

        head_list = parse_heads(heads)  # every check that needs no weights, before the load
        shape = peek_model_info(model)
        if shape is not None:
            check_heads(head_list, shape.n_layers, shape.n_heads)
        check_eps(eps)
        check_writable(out)
        lm = load_model(model, device=device, dtype=dtype)
        folder = run_export(lm, head_list, out, mode=mode, eps=eps)
        result: dict[str, Any] = {
            "command": "export-surgery",
            "model": model,
            "heads": head_names(head_list),
            "mode": mode,
            "eps": eps,
            "out": str(folder),
        }
        if verify:
            result["verify"] = verify_export(lm, head_list, folder, mode=mode, eps=eps)
        return result

    result = run_command(work)
    show(result, json_out)


