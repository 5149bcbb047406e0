"""Conventions every finesteer command follows.

Logs and progress go to stderr; the result goes to stdout, as one JSON object with `--json` so
scripts can consume it, or as a readable table otherwise. A user error (a `FinesteerError`, a
missing or unreadable file, malformed JSON/YAML or a recipe that fails validation) becomes one line
`error: …` on stderr and exit code 2; `finesteer --debug …` prints its traceback as well. Anything
else is a bug and propagates with its traceback (exit code 1).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from finesteer.errors import FinesteerError

if TYPE_CHECKING:
    from finesteer.interventions.edit import Intervention
    from finesteer.models.info import ModelInfo
    from finesteer.models.loading import LoadedModel

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
# Set by the root callback on every invocation (`finesteer --debug …` or FINESTEER_DEBUG=1).
_DEBUG: ContextVar[bool] = ContextVar("finesteer_debug", default=False)

FILE_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
# Input the user gave badly raises a FinesteerError; a plain ValueError is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FinesteerError, *FILE_ERRORS)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is a mistake in the user's input or files (one line) rather than a bug (traceback)."""
    return isinstance(exc, (*USER_ERRORS, json.JSONDecodeError, *_parse_error_types()))


def _parse_error_types() -> tuple[type[BaseException], ...]:
    """YAML and pydantic validation errors: user input errors, if those libraries are already loaded."""
    kinds: list[type[BaseException]] = []
    yaml = sys.modules.get("yaml")
    if yaml is not None:
        kinds.append(yaml.YAMLError)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None:
        kinds.append(pydantic.ValidationError)
    return tuple(kinds)


def error_line(exc: BaseException) -> str:
    """The error as one line: its message with line breaks folded into '; '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


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


def set_debug(debug: bool) -> None:
    """Remember `--debug` for this invocation (the root callback sets it every time)."""
    _DEBUG.set(debug)


def debug_enabled() -> bool:
    return _DEBUG.get()


def finite_json(value: Any, where: str = "", warnings: list[str] | None = None) -> Any:
    """`value` with every NaN/Infinity replaced by null, which JSON can carry (a bare `NaN` is not JSON).

    A replaced value under a dict key gets a sibling `"<key>_reason"`; one inside a list is reported in
    `warnings` (its path, e.g. 'rows[3].kl') — the caller adds those as a top-level `warnings` list.
    """
    warnings = [] if warnings is None else warnings
    if isinstance(value, float) and not math.isfinite(value):
        warnings.append(f"{where or 'value'} was {value} (not finite), written as null")
        return None
    if isinstance(value, dict):
        clean: dict[Any, Any] = {}
        for key, item in value.items():
            before = len(warnings)
            clean[key] = finite_json(item, f"{where}.{key}" if where else str(key), warnings)
            if isinstance(item, float) and len(warnings) > before:
                warnings.pop()  # said where it is: next to the value
                clean[f"{key}_reason"] = f"{item} (not finite) written as null"
        return clean
    if isinstance(value, (list, tuple)):
        return [finite_json(item, f"{where}[{i}]", warnings) for i, item in enumerate(value)]
    return value


def emit_json(result: dict[str, Any]) -> None:
    """The one JSON object a command prints on stdout: valid JSON always (`finite_json`)."""
    warnings: list[str] = []
    clean = finite_json(result, "", warnings)
    if warnings:
        clean["warnings"] = [*clean.get("warnings", []), *warnings]
    sys.stdout.write(json.dumps(clean, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def show(result: dict[str, Any], json_out: bool) -> None:
    """A command's result: one JSON object with `--json`, else a two-column table (nested values as JSON)."""
    if json_out:
        emit_json(result)
        return
    from rich.table import Table

    table = Table(show_header=False, title=str(result.get("command", "")))
    for key, value in result.items():
        if key == "command":
            continue
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, text)
    Console().print(table)


def show_json(result: dict[str, Any], json_out: bool) -> None:
    """A command's result as one JSON object: compact on stdout with `--json`, else pretty-printed."""
    if json_out:
        emit_json(result)
        return
    Console().print_json(json.dumps(result, default=str))


def print_rows(title: str, rows: Iterable[tuple[str, Any]], float_format: str = ".3f") -> None:
    """A titled two-column table; floats in `float_format`, None as '-'."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        if value is None:
            text = "-"
        else:
            text = format(value, float_format) if isinstance(value, float) else str(value)
        table.add_row(key, text)
    Console().print(table)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors into one line on stderr and exit code 2; let bugs propagate with their traceback."""
    try:
        yield
    except Exception as exc:
        if not is_user_error(exc):
            raise  # a bug (or typer.Exit): its traceback matters
        if debug_enabled():
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        typer.echo(f"{typer.style('error:', fg='red', bold=True)} {error_line(exc)}", err=True)
        raise typer.Exit(code=USER_ERROR_EXIT_CODE) from exc


def run_command(fn: Callable[[], T]) -> T:
    with user_errors():
        return fn()


def load_with_intervention(
    model: str,
    intervention: Path | None,
    allow_other_weights: bool = False,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[LoadedModel, Intervention | None]:
    """`--intervention` and the model, the artifact read and checked first (a bad folder, another
    shape, out-of-range edits or other weights fail before the load) and again against the loaded
    model (`--allow-other-weights` accepts other weights of the same shape). `--device`/`--dtype`
    place and cast the model."""
    from finesteer.artifacts import load_intervention
    from finesteer.models import load_model

    artifact = load_intervention(intervention) if intervention else None
    if artifact is not None:  # shape, edits and fingerprint from the config / registry pin alone
        artifact.check_before_load(model, allow_other_weights=allow_other_weights)
    lm = load_model(model, device=device, dtype=dtype)
    if artifact is None:
        return lm, None
    artifact.check_model(lm, strict=not allow_other_weights)
    return lm, artifact.intervention


def model_shape(model: str) -> ModelInfo | None:
    """The model's shape from its config alone (None when it cannot be known before loading)."""
    from finesteer.models import peek_model_info

    return peek_model_info(model)


@contextmanager
def output_folder(folder: Path | None) -> Iterator[Path | None]:
    """Hold `folder` for the whole command: checked writable and locked before any model loads, so a
    bad `--out` or a second writer fails at once (`finesteer.runs.FolderLock`)."""
    if folder is None:
        yield None
        return
    from finesteer.runs import FolderLock

    with FolderLock(folder):
        yield folder


def check_model_heads(model: str, heads: list[tuple[int, int]] | None) -> None:
    """`--heads` against the model's shape from its config, before loading (skipped when unknown)."""
    from finesteer.sites import check_heads

    info = model_shape(model)
    if heads and info is not None:
        check_heads(heads, info.n_layers, info.n_heads)
