"""The `finesteer` command line: one sub-command per stage or recipe."""

from __future__ import annotations

from typing import Annotated

import typer

from finesteer.cli import core
from finesteer.cli.common import setup_logging

app = typer.Typer(
    name="finesteer",
    help="Locate the attention heads and SAE atoms behind a behaviour, and steer or ablate exactly those.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    setup_logging(verbose)


app.command("models")(core.models)
app.command("info")(core.info)
app.command("generate")(core.generate)


def main() -> None:
    app()
