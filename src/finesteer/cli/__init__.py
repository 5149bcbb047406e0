"""The `finesteer` command line: one sub-command per stage or recipe.

One module per command group (core, locate, fit, eval, sae, compare, ablate, run), each registering
its commands on the groups in `cli.apps`; importing the modules below is what makes the commands
exist. Shared options live in `cli.options`, error handling and output in `cli.common`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from finesteer.cli.apps import app
from finesteer.cli.common import set_debug, setup_logging


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="FINESTEER_DEBUG",
            help="Show the traceback of an error, not only its one-line message.",
        ),
    ] = False,
) -> None:
    setup_logging(verbose)
    set_debug(debug)


# Each group's module registers its commands on import: core first (its commands head `--help`), then
# one import per module, alphabetical.
from finesteer.cli import core as _core  # noqa: E402,F401, I001
from finesteer.cli import ablate as _ablate  # noqa: E402,F401
from finesteer.cli import compare as _compare  # noqa: E402,F401
from finesteer.cli import eval as _eval  # noqa: E402,F401
from finesteer.cli import export as _export  # noqa: E402,F401
from finesteer.cli import fit as _fit  # noqa: E402,F401
from finesteer.cli import frontier as _frontier  # noqa: E402,F401
from finesteer.cli import locate as _locate  # noqa: E402,F401
from finesteer.cli import locate_attribution as _locate_attribution  # noqa: E402,F401
from finesteer.cli import locate_overlap as _locate_overlap  # noqa: E402,F401
from finesteer.cli import refusal_locate as _refusal_locate  # noqa: E402,F401
from finesteer.cli import run as _run  # noqa: E402,F401
from finesteer.cli import sae as _sae  # noqa: E402,F401
from finesteer.cli import serve as _serve  # noqa: E402,F401


def main() -> None:
    app()
