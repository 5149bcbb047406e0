"""Engine commands: list models, describe one, generate with or without an intervention."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from finesteer.cli.apps import app
from finesteer.cli.common import emit_json, load_with_intervention, run_command, stderr_console
from finesteer.cli.options import (
    DeviceOpt,
    DtypeOpt,
    InterventionOpt,
    JsonFlag,
    ModelArg,
    OtherWeightsOpt,
    SystemOpt,
)


@app.command("models")
def models(json_out: JsonFlag = False) -> None:
    """List the offline model registry and what is already in the local cache."""
    from finesteer.models.offline import registry_status
    from finesteer.models.tiny import TINY_CONFIGS
    from finesteer.runs import cache_root

    rows = run_command(registry_status)
    if json_out:
        emit_json({"cache_root": str(cache_root()), "models": rows, "tiny_models": list(TINY_CONFIGS)})
        return
    table = Table(title=f"finesteer registry (cache: {cache_root()})")
    for column in ("name", "family", "cached", "size", "description"):
        table.add_column(column)
    for row in rows:
        size = f"{row['size_bytes'] / 1e6:.0f} MB" if row["size_bytes"] else "-"
        table.add_row(row["name"], row["family"], "yes" if row["cached"] else "no", size, row["description"])
    Console().print(table)
    Console().print(f"tiny test models (random weights): {', '.join(TINY_CONFIGS)}")


@app.command("info")
def info(
    model: ModelArg,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Show a model's architecture: layers, query heads, kv heads, head_dim, hidden size."""
    from finesteer.models import load_model
    from finesteer.models.loading import describe_placement

    lm = run_command(lambda: load_model(model, device=device, dtype=dtype))
    result = {
        "model": model,
        **lm.info.to_dict(),
        "fingerprint": lm.fingerprint,
        "chat_template": lm.has_chat_template,
        "device": describe_placement(lm),
        "dtype": str(lm.dtype).removeprefix("torch."),
    }
    if json_out:
        emit_json(result)
        return
    table = Table(title=model, show_header=False)
    for key in (
        "family",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "hidden_size",
        "vocab_size",
        "chat_template",
        "device",
        "dtype",
    ):
        table.add_row(key, str(result[key]))
    Console().print(table)


@app.command("generate")
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="User message (the chat template is applied unless --raw).")],
    intervention: InterventionOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    system: SystemOpt = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Use the prompt text as is, without chat template.")
    ] = False,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also generate without the intervention, side by side.")
    ] = False,
    allow_other_weights: OtherWeightsOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Generate a reply, optionally with a saved intervention applied."""
    from finesteer.data.prompts import chat_prompt
    from finesteer.generation import GenerationConfig
    from finesteer.generation import generate as run_generate

    def work() -> dict[str, object]:
        config = GenerationConfig(  # checked before loading
            max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, seed=seed
        )
        lm, iv = load_with_intervention(model, intervention, allow_other_weights, device=device, dtype=dtype)
        text = prompt if raw else chat_prompt(lm.tokenizer, prompt, system=system)
        stderr_console().print(f"generating with {model}" + (f" + {intervention}" if intervention else ""))
        steered = run_generate(lm, [text], config, intervention=iv)[0]
        result: dict[str, object] = {
            "model": model,
            "prompt": prompt,
            "intervention": str(intervention or ""),
            "output": steered,
        }
        if compare and iv is not None:
            result["baseline_output"] = run_generate(lm, [text], config)[0]
        return result

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    console = Console()
    if "baseline_output" in result:
        table = Table(show_lines=True)
        table.add_column("without intervention")
        table.add_column("with intervention")
        table.add_row(str(result["baseline_output"]), str(result["output"]))
        console.print(table)
    else:
        console.print(str(result["output"]), highlight=False, markup=False)


@app.command("datasets")
def datasets(json_out: JsonFlag = False) -> None:
    """List the built-in datasets (kind, rows per split, licence) and the file format `--data` reads."""
    from finesteer.data import list_datasets
    from finesteer.data.typed import file_formats

    def work() -> dict[str, object]:
        rows = [
            {
                "name": d.name, "kind": d.kind, "splits": dict(d.rows), "default_split": d.default_split,
                "rows": d.rows[d.default_split], "licence": d.licence, "non_commercial": d.non_commercial,
                "description": d.description,
            }
            for d in list_datasets()
        ]  # fmt: skip
        return {"datasets": rows, "file_formats": file_formats()}

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    table = Table(title="built-in datasets (--data NAME)")
    for column in ("name", "kind", "rows (default split)", "splits", "licence"):
        table.add_column(column)
    for row in result["datasets"]:  # type: ignore[attr-defined]
        splits = ", ".join(f"{s} {n}" for s, n in row["splits"].items())
        table.add_row(row["name"], row["kind"], str(row["rows"]), splits, row["licence"])
    Console().print(table)
    console = Console()
    console.print("[bold]your own file (--data FILE, --columns FIELD=COLUMN,…)[/]")
    for kind, spec in result["file_formats"].items():  # type: ignore[attr-defined]
        required = "; ".join(f"{f} ({'/'.join(c)})" for f, c in spec["required"].items())
        optional = ", ".join(spec["optional"])
        console.print(f"  {kind}: required {required}; optional {optional}", highlight=False, markup=False)
    console.print("  files: .jsonl (one object a line), .json (an array of objects), .csv (a header row)",
                  highlight=False, markup=False)  # fmt: skip
