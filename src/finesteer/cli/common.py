"""Conventions every finesteer command follows.

Logs and progress go to stderr; the result goes to stdout, as one JSON object with `--json` so
scripts can consume it, or as a readable table otherwise. Errors become a one-line message on stderr
and exit code 2, never a traceback for a user mistake.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

T = TypeVar("T")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, RuntimeError)


def stderr_console() -> Console:
    return Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=stderr_console(), show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit_json(result: dict[str, Any]) -> None:
    """The one JSON object a command prints on stdout."""
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures (bad names, ranges, files) into a clean message and exit code 2."""
    try:
        yield
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        stderr_console().print(f"[bold red]error:[/] {message}", highlight=False)
        raise typer.Exit(code=2) from exc


def run_command(fn: Callable[[], T]) -> T:
    with user_errors():
        return fn()
