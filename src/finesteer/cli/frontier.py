"""`finesteer frontier`: the refusal-vs-cost frontier of steering methods and head ablations.

Every (intervention, strength) point is measured once into `--out/points/` (a rerun skips finished
points); the table, the equal-over-refusal comparison and two charts land in `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.cli.options import (
    DeviceOpt,
    DtypeOpt,
    JsonFlag,
    ModelArg,
    OptionError,
    parse_names,
    parse_numbers,
    parse_settings,
)


@app.command("frontier")
def frontier_command(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", help="Results folder (resumable): frontier.json, PNG charts.")
    ],
    sae: Annotated[
        Path | None, typer.Option("--sae", help="SAE folder (needed by caa, sae_all, sta*).")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma list of refusal-task methods (registry names); '' for none.")
    ] = "baseline,prompt,caa,sae_all,sta,sta_output",
    lambdas: Annotated[str, typer.Option(help="Multipliers λ swept for the vector methods.")] = "0.5,1,1.5",
    goal: Annotated[
        str, typer.Option(help="induce: y = refusal rate (steering towards refusal); remove: y = ASR.")
    ] = "induce",
    heads: Annotated[
        str | None, typer.Option(help="Head ranking to ablate top-k of, e.g. '12.3,13.1,4.0' (LAYER.HEAD).")
    ] = None,
    ranking: Annotated[
        Path | None, typer.Option(help="Or a head-scores folder (`finesteer locate …` output) to rank by.")
    ] = None,
    ks: Annotated[str, typer.Option(help="Head counts k of the top-k ablations.")] = "1,3,8",
    seeds: Annotated[str, typer.Option(help="Seeds of the random-head (and direction) controls.")] = "0,1,2",
    mode: Annotated[
        str, typer.Option(help="Head ablation: ua (uniform attention) or sc (scale output).")
    ] = "ua",
    direction_controls_at: Annotated[
        float | None, typer.Option(help="Also random-direction controls of each vector at this λ.")
    ] = None,
    head_steer_k: Annotated[
        int, typer.Option(help="Also HSI-style steering of the k most refusal-separating heads (0 = off).")
    ] = 0,
    head_steer_alpha: Annotated[float, typer.Option(help="α (in σ) of head steering at λ = 1.")] = 8.0,
    n_harmful: Annotated[int, typer.Option(help="Held-out JailbreakBench prompts.")] = 50,
    n_harmless: Annotated[int, typer.Option(help="XSTest-safe prompts (over-refusal).")] = 50,
    n_kl: Annotated[int, typer.Option(help="Harmless prompts for the next-token KL.")] = 50,
    n_mc: Annotated[int, typer.Option(help="finesteer-mc questions for MC accuracy (0 = skip).")] = 0,
    n_pairs: Annotated[int, typer.Option(help="Training triples of the steering methods.")] = 160,
    trim: Annotated[float, typer.Option(help="STA trim.")] = 0.35,
    settings: Annotated[
        str | None, typer.Option(help='Per-method settings, JSON: \'{"sta_output": {"output_keep": 0.3}}\'.')
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per reply.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 25,
    judge: Annotated[str, typer.Option(help="Keyword refusal judge: gcg+, gcg or ships.")] = "gcg+",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Refusal (or ASR) against harmless cost for steering methods, head ablations and random controls."""
    from finesteer.locate.scores import HeadScores
    from finesteer.recipes.frontier import FrontierExperiment, frontier_experiment, summary
    from finesteer.report.frontier import equal_cost_table, frontier_table, markdown
    from finesteer.sites import parse_heads

    def work() -> dict[str, Any]:
        if heads is not None and ranking is not None:
            raise OptionError("give --heads or --ranking, not both")
        head_list: list[tuple[int, int]] = parse_heads(heads) if heads else []
        ks_parsed = parse_numbers(ks, "--ks", int) or ()
        if ranking is not None:
            head_list = HeadScores.load(ranking).top_heads(max(ks_parsed))
        experiment = FrontierExperiment(
            methods=tuple(parse_names(methods, "--methods")) if methods.strip() else (),
            lambdas=parse_numbers(lambdas, "--lambdas") or (),
            goal=goal,
            heads=tuple(head_list),
            ks=ks_parsed if head_list else (),
            seeds=parse_numbers(seeds, "--seeds", int) or (),
            ablation_mode=mode,
            head_name=ranking.name if ranking is not None else "heads",
            direction_controls_at=direction_controls_at,
            head_steer_k=head_steer_k,
            head_steer_alpha=head_steer_alpha,
            n_harmful=n_harmful,
            n_harmless=n_harmless,
            n_kl=n_kl,
            n_mc=n_mc,
            n_pairs=n_pairs,
            trim=trim,
            method_settings=parse_settings(settings),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            judge=judge,
        )
        table = frontier_experiment(model, out, experiment, sae, device=device, dtype=dtype)
        text = "\n\n".join(
            markdown(t) for t in (frontier_table(table), equal_cost_table(table["equal_over_refusal"]))
        )
        stderr_console().print(text, highlight=False, markup=False, soft_wrap=True)
        return {**table, "summary": summary(table)}

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    from rich.console import Console

    for key, value in result["summary"].items():
        Console().print(f"{key}: {value}")
    Console().print(f"table and charts in {out}")
