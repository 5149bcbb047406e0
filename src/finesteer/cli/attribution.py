"""`locate attribution`: gradient pre-ranking of every head, then exact verification of the best.

Writes OUT/estimate/ (the attribution estimate of every head, a HeadScores folder), OUT/ (exact
scores of the verified heads, 0 elsewhere), heatmaps, `prompts.jsonl` and `run.json` with the final
ranking (verified heads by exact score first), the rank agreement and the timing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import locate_app
from finesteer.cli.common import run_command, show, stderr_console
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
    slug,
)

METRICS: tuple[str, ...] = ("kl", "refusal")


def _metric(name: str, outcomes: int, tokenizer: Any) -> Any:
    from finesteer.locate.attribution.metrics import KLDivergence, TokenLogProb, refusal_token_ids

    return KLDivergence(outcomes) if name == "kl" else TokenLogProb(refusal_token_ids(tokenizer))


@locate_app.command("attribution")
def attribution(
    model: ModelArg,
    data: PromptDataOpt,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    metric: Annotated[
        str,
        typer.Option(
            help="kl (query-level Ships: KL from the unablated next-token distribution, second order) or "
            "refusal (drop in log p(refusal opening tokens), first order)."
        ),
    ] = "kl",
    top_n: Annotated[int, typer.Option(help="Heads verified exactly (the estimate's best).")] = 16,
    outcomes: Annotated[int, typer.Option(help="KL: likeliest tokens kept as outcomes (+ the rest).")] = 2,
    linearize: Annotated[
        str, typer.Option(help="activation (ua: exact uniform-attention output change) or gate.")
    ] = "activation",
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: Annotated[Path | None, typer.Option("--out", help="Run folder.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Estimate every head's ablation effect from one forward + backward, verify the top ones exactly."""

    def work() -> dict[str, Any]:
        from finesteer.data.typed import load_queries
        from finesteer.locate import run_folder
        from finesteer.locate import ships as ships_lib
        from finesteer.locate.attribution.prerank import pre_ranked_scan
        from finesteer.models import load_model
        from finesteer.report.heatmap import plot_head_heatmap

        check_choice(metric, METRICS, "--metric")
        ships_lib.ablation_method(mode)
        folder = out or Path("runs") / slug("attribution", model, data, mode, metric)
        queries, ids = load_queries(data, split, limit)
        lm = load_model(model)
        prompts = ships_lib.format_queries(lm, queries, template)
        chosen = _metric(metric, outcomes, lm.tokenizer)
        n_heads = lm.info.n_layers * lm.info.n_heads
        stderr_console().print(
            f"Attribution ({metric}, {mode}, ε={eps}) of {n_heads} heads of {model} on {len(prompts)} "
            f"prompts, verifying the top {top_n}"
        )
        started = time.perf_counter()
        result = pre_ranked_scan(
            lm,
            prompts,
            chosen,
            mode=mode,
            eps=eps,
            top_n=top_n,
            linearize=linearize,
            batch_size=batch_size,
            engine=engine,
        )
        seconds = round(time.perf_counter() - started, 1)
        info = {
            "command": "locate attribution",
            "model": model,
            "data": data,
            "split": split,
            "limit": limit,
            "n_prompts": len(prompts),
            "mode": mode,
            "eps": eps,
            "metric": chosen.key(),
            "linearize": linearize,
            "top_n": top_n,
        }
        payload = run_folder.save_attribution(folder, result, queries, ids, info, seconds)
        estimate_map = folder / run_folder.ESTIMATE_DIR / run_folder.HEATMAP_FILE
        plot_head_heatmap(result.estimate, estimate_map, title=f"estimate · {model}")
        plot_head_heatmap(result.scores, folder / run_folder.HEATMAP_FILE, title=f"verified heads · {model}")
        return payload

    show(run_command(work), json_out)
