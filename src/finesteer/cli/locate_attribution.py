"""`finesteer locate attribution`: every head's ablation effect estimated from one forward + backward,
then verified exactly — adaptively until the printed bound says no unverified head is likely to belong
in the top-k, or the best `--top-n`. Metrics: Ships' KL, the refusal log-probability, the A/B margin.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import locate_app
from finesteer.cli.common import run_command, show, stderr_console
from finesteer.cli.locate import scan_prompts
from finesteer.cli.options import (
    BatchOpt,
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    EpsOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    ModeOpt,
    OptionError,
    PromptDataOpt,
    SplitOpt,
    TemplateOpt,
    TopNOpt,
    check_choice,
    data_source,
    slug,
)

METRICS = ("kl", "refusal", "ab")


def _ab_inputs(
    model: str, data: str, split: str | None, limit: int | None, both_orders: bool, device: str, dtype: str
) -> tuple[Any, list[str], list[str], Any, Any]:
    """The model, item questions and ids, encoded A/B sequences and their letter-margin metric."""
    from finesteer.data.typed import load_ab_set
    from finesteer.locate.attribution.ab_inputs import ab_attribution_inputs
    from finesteer.models import load_model

    items = load_ab_set(data, split, limit)
    lm = load_model(model, device=device, dtype=dtype)
    encoded, metric, ids = ab_attribution_inputs(lm, items, both_orders=both_orders)
    by_id = {item.id: item.question for item in items}
    queries = [by_id.get(i.removesuffix("~swap"), "") for i in ids]
    return lm, queries, ids, encoded, metric


@locate_app.command("attribution")
def attribution(
    model: ModelArg,
    data: PromptDataOpt,
    columns: ColumnsOpt = None,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    metric: Annotated[
        str, typer.Option(help="kl (query-level Ships: KL from the unablated next-token distribution, second "
                          "order), refusal (drop in log p(refusal opening tokens), first order) or ab (drop "
                          "in the A/B letter margin towards the matching answer; --data is an A/B set).")
    ] = "kl",
    top_n: TopNOpt = None,
    confidence: Annotated[
        float, typer.Option(help="Adaptive verification: stop when no unverified head enters the top "
                            "--certify-top with this probability (the bound is printed either way).")
    ] = 0.99,
    certify_top: Annotated[int, typer.Option(help="The top-k the bound is about.")] = 10,
    both_orders: Annotated[
        bool, typer.Option("--balanced/--single-order", help="ab: every item in both option orders.")
    ] = True,
    outcomes: Annotated[int, typer.Option(help="KL: likeliest tokens kept as outcomes (+ the rest).")] = 2,
    linearize: Annotated[
        str, typer.Option(help="activation (ua: exact uniform-attention output change) or gate.")
    ] = "activation",
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: Annotated[Path | None, typer.Option("--out", help="Run folder.")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Estimate every head's ablation effect from one forward + backward, verify the top ones exactly."""

    def work() -> dict[str, Any]:
        from finesteer.locate import run_folder
        from finesteer.locate import ships as ships_lib
        from finesteer.locate.attribution.metrics import KLDivergence, TokenLogProb, refusal_token_ids
        from finesteer.locate.attribution.prerank import attribution_scan
        from finesteer.report.certificate import attribution_report
        from finesteer.runs.lock import FolderLock

        check_choice(metric, METRICS, "--metric")
        ships_lib.ablation_method(mode)
        if not 0.5 <= confidence < 1 or certify_top < 1:
            raise OptionError(f"--confidence must be in [0.5, 1) and --certify-top ≥ 1, got {confidence}, "
                              f"{certify_top}")
        source = data_source(data, columns, "ab" if metric == "ab" else "prompts")
        folder = out or Path("runs") / slug("attribution", model, data, mode, metric)
        with FolderLock(folder):  # checks the folder is writable, before the model loads
            if metric == "ab":
                lm, queries, ids, prompts, chosen = _ab_inputs(model, source, split, limit, both_orders,
                                                               device, dtype)  # fmt: skip
            else:
                lm, queries, ids, prompts = scan_prompts(model, source, split, limit, template, None, device,
                                                     dtype)  # fmt: skip
                refusal = metric == "refusal"
                chosen = TokenLogProb(refusal_token_ids(lm.tokenizer)) if refusal else KLDivergence(outcomes)
            n_heads = lm.info.n_layers * lm.info.n_heads
            stderr_console().print(f"Attribution ({metric}, {mode}, ε={eps}) of {n_heads} heads of {model} "
                                   f"on {len(prompts)} prompts, verifying {top_n or 'adaptively'}")
            started = time.perf_counter()
            result = attribution_scan(
                lm, prompts, chosen, top_n=top_n, k=min(certify_top, n_heads), confidence=confidence,
                mode=mode, eps=eps, linearize=linearize, batch_size=batch_size, engine=engine,
                say=stderr_console().print,
            )  # fmt: skip
            seconds = round(time.perf_counter() - started, 1)
            info = {
                "command": "locate attribution", "model": model, "data": data, "split": split, "limit": limit,
                "n_prompts": len(prompts), "mode": mode, "eps": eps, "metric": chosen.key(),
                "linearize": linearize, "top_n": top_n or len(result.verified), "confidence": confidence,
                **({"both_orders": both_orders} if metric == "ab" else {}),
            }  # fmt: skip
            payload = run_folder.save_attribution(folder, result, queries, ids, info, seconds)
            attribution_report(folder, result, payload)
            return payload

    show(run_command(work), json_out)
