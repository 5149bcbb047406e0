"""`finesteer sae train|eval`: train a sparse autoencoder on a model's residual stream, measure one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from finesteer.cli.apps import sae_app
from finesteer.cli.common import emit_json, print_rows, run_command, stderr_console
from finesteer.cli.options import DeviceOpt, DtypeOpt, JsonFlag, ModelArg


@sae_app.command("train")
def sae_train(
    model: ModelArg,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Train a TopK SAE on a model's residual stream from the prompts finesteer ships; resumable."""
    from finesteer.models import load_model, peek_model_info
    from finesteer.runs import check_writable
    from finesteer.sae.corpus import CorpusSpec
    from finesteer.sae.pipeline import default_sae_dir, train_on_model
    from finesteer.sae.train import TrainConfig
    from finesteer.sites import Site

    def work() -> dict[str, object]:
        started = time.perf_counter()
        config = TrainConfig(d_sae=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        info = peek_model_info(model)  # the layer and the folders are checked before loading
        if info is not None:
            Site(layer, "resid_post").validate(info)
        folder = out or default_sae_dir(model, layer, width, k)
        for path in (folder, run_dir):
            if path is not None:
                check_writable(path)
        lm = load_model(model, device=device, dtype=dtype)
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
    rows = {**heldout, **result["timings"]}  # type: ignore[dict-item]
    print_rows(f"SAE {result['sae_dir']}", rows.items(), ".4g")


@sae_app.command("eval")
def sae_eval(
    sae_dir: Annotated[Path, typer.Argument(help="SAE folder (cfg.json + sae_weights.safetensors).")],
    model: Annotated[str, typer.Argument(help="The model the SAE reads.")],
    n_per_source: Annotated[
        int, typer.Option(help="Held-out harmful / harmless texts (test splits); + 20 A/B per behaviour.")
    ] = 100,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Explained variance, L0, dead-latent share and MSE on held-out texts (test splits only)."""
    from finesteer.models import load_model
    from finesteer.sae import load_sae
    from finesteer.sae.pipeline import heldout_metrics

    def work() -> dict[str, object]:
        sae = load_sae(sae_dir)
        lm = load_model(model, device=device, dtype=dtype)
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
    print_rows(f"SAE {sae_dir} on held-out text", result.items(), ".4g")


