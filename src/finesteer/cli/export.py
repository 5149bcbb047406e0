"""`finesteer export gguf|lm-eval|hf`: a saved steering to llama.cpp, lm-eval or a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import run_command, show
from finesteer.cli.options import DeviceOpt, DtypeOpt, JsonFlag, OtherWeightsOpt

export_app = typer.Typer(
    help="Export a fitted steering (an artifact folder) to the runtimes people deploy.", no_args_is_help=True
)
app.add_typer(export_app, name="export")

ArtifactArg = Annotated[Path, typer.Argument(help="Steering/artifact folder written by a `fit` command.")]
ExportModelOpt = Annotated[
    str | None, typer.Option("--model", help="Model to export for (default: the one the artifact names).")
]

AllPositionsOpt = Annotated[
    bool,
    typer.Option(
        "--all-positions",
        help="Set every edit's scope to 'all' first (e.g. CAA's from_end:K): exports that approximation.",
    ),
]


def _run(fmt: str, artifact: Path, out: Path, json_out: bool, **options: object) -> None:
    from finesteer.export import export_artifact

    result = run_command(lambda: export_artifact(fmt, artifact, out, **options))  # type: ignore[arg-type]
    show({"command": f"export {fmt}", **result}, json_out)


@export_app.command("gguf")
def gguf(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option("--out", help="Control-vector file to write (.gguf).")],
    model: ExportModelOpt = None,
    allow_other_weights: OtherWeightsOpt = False,
    all_positions: AllPositionsOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """llama.cpp control vector (`--control-vector FILE`): residual-stream adds, scope 'all', layers ≥ 1."""
    _run("gguf", artifact, out, json_out, model=model, allow_other_weights=allow_other_weights,
         all_positions=all_positions, device=device, dtype=dtype)  # fmt: skip


@export_app.command("lm-eval")
def lm_eval(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option("--out", help="Steer file to write (.pt).")],
    model: ExportModelOpt = None,
    allow_other_weights: OtherWeightsOpt = False,
    all_positions: AllPositionsOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """lm-evaluation-harness `steered` model (`--model_args pretrained=…,steer_path=FILE.pt`)."""
    _run("lm-eval", artifact, out, json_out, model=model, allow_other_weights=allow_other_weights,
         all_positions=all_positions, device=device, dtype=dtype)  # fmt: skip


@export_app.command("hf")
def hf(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the HF model (must be empty).")],
    model: ExportModelOpt = None,
    allow_other_weights: OtherWeightsOpt = False,
    dtype: DtypeOpt = "float32",
    verify: Annotated[
        bool, typer.Option(help="Reload with stock transformers and compare logits with the hooked model.")
    ] = True,
    all_positions: AllPositionsOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonFlag = False,
) -> None:
    """A plain HF folder with the static edit folded into the weights (biases) — no hooks needed."""
    _run(
        "hf",
        artifact,
        out,
        json_out,
        model=model,
        allow_other_weights=allow_other_weights,
        dtype=dtype,
        verify=verify,
        all_positions=all_positions,
        device=device,
    )
