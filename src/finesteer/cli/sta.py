"""`finesteer sae train|eval` (sparse autoencoders) and `finesteer fit sta` (Steering Target Atoms)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from finesteer.cli.apps import app, eval_app, fit_app
from finesteer.cli.common import emit_json, run_command, stderr_console

sae_app = typer.Typer(
    help="Sparse autoencoders: train one on a model's residual stream, measure one.", no_args_is_help=True
)
app.add_typer(sae_app, name="sae")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]


def _table(title: str, rows: dict[str, object]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


@sae_app.command("train")
def sae_train(
    model: Annotated[str, typer.Argument(help="Model to read activations from (registry name, folder, …).")],
    layer: Annotated[
        int, typer.Option("--layer", help="Block whose output (hook_resid_post) the SAE reads.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="SAE folder (SAELens format); default in the cache.")
    ] = None,
    width: Annotated[int, typer.Option("--width", help="Number of latents (d_sae).")] = 4608,
    k: Annotated[int, typer.Option("--k", help="Active latents per token (TopK).")] = 64,
    tokens: Annotated[int, typer.Option("--tokens", help="Training tokens to collect.")] = 120_000,
    epochs: Annotated[float, typer.Option(help="Passes over the collected tokens.")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Tokens per Adam step.")] = 1024,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 5e-4,
    generations: Annotated[
        int, typer.Option(help="Append the model's greedy replies to this many prompts (slow on CPU).")
    ] = 0,
    run_dir: Annotated[
        Path | None, typer.Option(help="Activations + checkpoint folder (default OUT/run).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Reuse collected shards and the checkpoint.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the corpus shuffle and the SAE init.")] = 0,
    json_out: JsonFlag = False,
) -> None:
    """Train a TopK SAE on a model's residual stream from the prompts finesteer ships; resumable."""
    from finesteer.models import load_model
    from finesteer.sae.corpus import CorpusSpec
    from finesteer.sae.pipeline import default_sae_dir, train_on_model
    from finesteer.sae.train import TrainConfig

    def work() -> dict[str, object]:
        started = time.perf_counter()
        lm = load_model(model)
        folder = out or default_sae_dir(lm.name, layer, width, k)
        config = TrainConfig(d_sae=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        stderr_console().print(
            f"training a TopK SAE ({width} latents, k={k}) on {model} layer {layer} → {folder}"
        )
        result = train_on_model(
            lm,
            layer,
            folder,
            tokens=tokens,
            config=config,
            corpus=CorpusSpec(seed=seed),
            generations=generations,
            run_dir=run_dir,
            resume=resume,
        )
        return {"model": model, **result.to_dict(), "total_wall_s": round(time.perf_counter() - started, 1)}

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    heldout = result["heldout"]
    assert isinstance(heldout, dict)
    _table(f"SAE {result['sae_dir']}", {**heldout, **result["timings"]})  # type: ignore[dict-item]


@sae_app.command("eval")
def sae_eval(
    sae_dir: Annotated[Path, typer.Argument(help="SAE folder (cfg.json + sae_weights.safetensors).")],
    model: Annotated[str, typer.Argument(help="The model the SAE reads.")],
    n_per_source: Annotated[
        int, typer.Option(help="Held-out harmful / harmless texts (test splits); + 20 A/B per behaviour.")
    ] = 100,
    json_out: JsonFlag = False,
) -> None:
    """Explained variance, L0, dead-latent share and MSE on held-out texts (test splits only)."""
    from finesteer.models import load_model
    from finesteer.sae import load_sae
    from finesteer.sae.pipeline import heldout_metrics

    def work() -> dict[str, object]:
        sae = load_sae(sae_dir)
        lm = load_model(model)
        started = time.perf_counter()
        metrics = heldout_metrics(lm, sae, n_per_source=n_per_source)
        return {
            "sae_dir": str(sae_dir),
            "model": model,
            "hook_name": sae.cfg.hook_name,
            "d_sae": sae.cfg.d_sae,
            "architecture": sae.cfg.architecture,
            **metrics.to_dict(),
            "wall_s": round(time.perf_counter() - started, 1),
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    _table(f"SAE {sae_dir} on held-out text", result)


@fit_app.command("sta")
def fit_sta_command(
    model: Annotated[str, typer.Argument(help="Model to steer.")],
    sae: Annotated[Path, typer.Option("--sae", help="SAE folder (SAELens format) at the layer to steer.")],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to write.")],
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
    json_out: JsonFlag = False,
) -> None:
    """Fit Steering Target Atoms: select atoms, decode, match the CAA norm, write an artifact."""
    from finesteer.fit.sta import SELECTION_MODES, answer_pairs, fit_sta
    from finesteer.methods.data import load_triples
    from finesteer.models import load_model
    from finesteer.sae import load_sae

    def work() -> dict[str, object]:
        if mode not in SELECTION_MODES:
            raise ValueError(f"unknown --mode {mode!r}; choose {', '.join(SELECTION_MODES)}")
        if limit < 1:
            raise ValueError("--limit must be ≥ 1")
        loaded = load_sae(sae)
        lm = load_model(model)
        triples = load_triples(data, limit)
        if not triples:
            raise ValueError(f"--data {data!r} gave no triples")
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
    _table(f"STA artifact {out}", {k: v for k, v in result.items() if k != "top_atoms"})


@eval_app.command("sta-refusal")
def sta_refusal_command(
    model: Annotated[str, typer.Argument(help="Model to steer towards refusing harmful requests.")],
    sae: Annotated[Path, typer.Option("--sae", help="SAE folder at the layer to steer.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (resumable): results.json, table.md.")],
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of baseline, prompt, caa, sae_all, sta, sta_amplitude, "
            "sta_frequency, prompt_caa, prompt_sta."
        ),
    ] = "baseline,prompt,caa,sae_all,sta",
    lambdas: Annotated[
        str, typer.Option(help="Comma list of multipliers λ for the vector methods.")
    ] = "0.5,1,1.5,2",
    headline: Annotated[float, typer.Option(help="λ reported under `methods` in the JSON.")] = 1.0,
    trim: Annotated[float, typer.Option(help="STA trim.")] = 0.35,
    n_pairs: Annotated[
        int, typer.Option(help="Training triples (4/5 templated harmful, 1/5 CAA A/B).")
    ] = 160,
    n_harmful: Annotated[int, typer.Option(help="JailbreakBench prompts (evenly spaced).")] = 40,
    n_harmless: Annotated[int, typer.Option(help="XSTest-safe prompts (evenly spaced).")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per reply.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 40,
    judge: Annotated[
        str, typer.Option(help="Keyword refusal judge: gcg+ (GCG + inability phrases), gcg, ships.")
    ] = "gcg+",
    json_out: JsonFlag = False,
) -> None:
    """Refusal steering head to head: prompting vs CAA vs SAE-all-atoms vs STA across λ."""
    from finesteer.recipes.refusal import markdown_table, refusal_comparison

    def work() -> dict[str, object]:
        payload = refusal_comparison(
            model, sae, out, methods=methods, lambdas=lambdas, headline=headline, trim=trim,
            n_pairs=n_pairs, n_harmful=n_harmful, n_harmless=n_harmless, max_new_tokens=max_new_tokens,
            batch_size=batch_size, judge=judge,
        )  # fmt: skip
        stderr_console().print(markdown_table(payload), highlight=False, markup=False)
        return payload

    result = run_command(work)
    if json_out:
        emit_json(result)
