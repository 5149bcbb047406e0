"""`finesteer frontier`: the refusal-vs-cost frontier of steering methods and head ablations.

Every (intervention, strength) point is measured once into `--out/points/` (a rerun skips finished
points); the table, the equal-over-refusal comparison and two charts land in `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import check_model_heads, emit_json, run_command, stderr_console
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
        list[str] | None,
        typer.Option(
            help="Head ranking to ablate top-k of, best first: '12.3,13.1,4.0' or 'NAME=12.3,13.1' "
            "(repeatable; the first one's top-k get the random-head controls)."
        ),
    ] = None,
    ranking: Annotated[
        list[Path] | None,
        typer.Option(
            help="Or a folder to rank by (repeatable): head scores (`finesteer locate …`) or a "
            "`locate joint` run (its forward-selection order)."
        ),
    ] = None,
    direction: Annotated[
        list[Path] | None,
        typer.Option(
            help="Refusal direction folder (`locate refusal-direction`, repeatable): ablated everywhere "
            "(--goal remove) or added at its layer over --lambdas (induce)."
        ),
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
    from finesteer.locate.run_folder import ranking_from_folder
    from finesteer.recipes.frontier import FrontierExperiment, frontier_experiment, summary
    from finesteer.report.frontier import equal_cost_table, frontier_table, markdown

    def work() -> dict[str, Any]:
        ks_parsed = parse_numbers(ks, "--ks", int) or ()
        ranked = [_named_heads(text, i) for i, text in enumerate(heads or [])]
        for folder in ranking or []:
            if not folder.exists():
                raise OptionError(f"--ranking {folder}: no such folder")
            ranked.append((folder.name, tuple(ranking_from_folder(folder, max(ks_parsed, default=1)))))
        for _, listed in ranked:
            check_model_heads(model, list(listed))  # against the model's shape, before it loads
        for folder in direction or []:
            if not folder.is_dir():
                raise OptionError(f"--direction {folder}: no such folder")
        experiment = FrontierExperiment(
            methods=tuple(parse_names(methods, "--methods")) if methods.strip() else (),
            lambdas=parse_numbers(lambdas, "--lambdas") or (),
            goal=goal,
            rankings=tuple(ranked),
            directions=tuple(str(d) for d in direction or []),
            ks=ks_parsed if ranked else (),
            seeds=parse_numbers(seeds, "--seeds", int) or (),
            ablation_mode=mode,
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


def _named_heads(text: str, index: int) -> tuple[str, tuple[tuple[int, int], ...]]:
    """'NAME=12.3,4.0' or '12.3,4.0' (named 'heads', or 'heads2'… after the first) as a named ranking."""
    from finesteer.sites import parse_heads

    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = ("heads" if index == 0 else f"heads{index + 1}"), text
    if not name.strip():
        raise OptionError(f"--heads {text!r}: empty ranking name before '='")
    return name.strip(), tuple(parse_heads(rest))
