"""The command groups; each area's module registers its commands on these (`@locate_app.command(...)`)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="finesteer",
    help="Locate the attention heads and SAE atoms behind a behaviour, and steer or ablate exactly those.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
locate_app = typer.Typer(
    help="Score every head (or atom) for a behaviour; writes a run folder.", no_args_is_help=True
)
fit_app = typer.Typer(
    help="Fit an intervention (directions and strengths); writes an artifact.", no_args_is_help=True
)
eval_app = typer.Typer(
    help="Measure behaviour and ability, with or without an intervention.", no_args_is_help=True
)
sae_app = typer.Typer(
    help="Sparse autoencoders: train one on a model's residual stream, measure one.", no_args_is_help=True
)

app.add_typer(locate_app, name="locate")
app.add_typer(fit_app, name="fit")
app.add_typer(eval_app, name="eval")
app.add_typer(sae_app, name="sae")
