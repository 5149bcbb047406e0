"""The `finesteer` command line: one sub-command per stage or recipe.

Each area lives in its own module and registers its commands on the groups in `cli.apps`; importing
the modules below is what makes the commands exist.
"""

from __future__ import annotations

from typing import Annotated

import typer

from finesteer.cli import core
from finesteer.cli.apps import app
from finesteer.cli.common import setup_logging


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    setup_logging(verbose)


app.command("models")(core.models)
app.command("info")(core.info)
app.command("generate")(core.generate)

# Area modules register their commands on import (keep one import per area, alphabetical).
from finesteer.cli import attribution as _attribution  # noqa: E402,F401
from finesteer.cli import compare as _compare  # noqa: E402,F401
from finesteer.cli import evaluate as _evaluate  # noqa: E402,F401
from finesteer.cli import hsi as _hsi  # noqa: E402,F401
from finesteer.cli import locate as _locate  # noqa: E402,F401
from finesteer.cli import run as _run  # noqa: E402,F401
from finesteer.cli import serve as _serve  # noqa: E402,F401
from finesteer.cli import sta as _sta  # noqa: E402,F401


def main() -> None:
    app()
