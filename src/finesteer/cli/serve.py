"""`finesteer serve`: put a model behind an OpenAI-compatible API, interventions chosen per request."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import run_command, stderr_console
from finesteer.cli.options import DeviceOpt, DtypeOpt, OptionError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _named_folders(specs: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise OptionError(f"--intervention takes NAME=FOLDER, got {spec!r}")
        pairs.append((name.strip(), Path(folder.strip())))
    return pairs


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Argument(help="Model to serve (registry name, tiny-*, folder, .gguf).")],
    intervention: Annotated[
        list[str] | None,
        typer.Option("--intervention", "-i", help="NAME=FOLDER: an artifact to offer as NAME (repeatable)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="FINESTEER_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    ] = None,
    allow_dir: Annotated[
        list[Path] | None,
        typer.Option("--allow-dir", help="Allow POST /v1/interventions to load folders under DIR."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together in one batch.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="max_tokens when a request gives none.")] = 256,
    max_scale: Annotated[float, typer.Option(help="Largest |scale| a request may ask for.")] = 100.0,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Accept artifacts fitted on other weights of the same shape.")
    ] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Serve MODEL with /v1/chat/completions, /v1/completions, /v1/models and /v1/interventions."""
    try:
        import uvicorn

        from finesteer.serve import InterventionRegistry, ServeConfig, create_app
    except ImportError as exc:
        stderr_console().print(f"[bold red]error:[/] {exc.name} is missing: pip install 'finesteer[serve]'")
        raise typer.Exit(code=2) from exc
    from finesteer.models import load_model

    def build() -> object:
        if max_batch < 1 or max_tokens < 1:
            raise OptionError("--max-batch and --max-tokens must be ≥ 1")
        named = _named_folders(intervention or [])
        lm = load_model(model, device=device, dtype=dtype)
        registry = InterventionRegistry(
            lm, allow_dirs=allow_dir or [], allow_other_weights=allow_other_weights
        )
        for name, folder in named:
            entry = registry.load(name, folder)
            log.info("intervention %s: %d edits from %s", name, len(entry.intervention or ()), folder)
        config = ServeConfig(
            model,
            api_key=api_key or None,
            max_batch=max_batch,
            max_scale=max_scale,
            default_max_tokens=max_tokens,
        )
        return create_app(lm, registry, config)

    server_app = run_command(build)
    if host not in LOOPBACK and not api_key:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the model", host)
    stderr_console().print(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C to stop)")
    # log_config=None: uvicorn logs (access lines too) go through finesteer's stderr handler
    uvicorn.run(server_app, host=host, port=port, log_level="info", log_config=None)  # type: ignore[arg-type]
