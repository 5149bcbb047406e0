"""End-to-end pipelines driven by a typed recipe, writing a resumable run folder with a report."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from finesteer.data import CATALOG
from finesteer.data.errors import DatasetError
from finesteer.evaluate.eval_sets import load_eval_sets
from finesteer.models import peek_model_info
from finesteer.recipes.config import (
    HSIRecipe,
    RecipeError,
    RefusalHeadsRecipe,
    ShipsRecipe,
    STARecipe,
    check_against_model,
    load_recipe,
    parse_recipe,
)
from finesteer.recipes.run import RunFolder, RunResumeError, StepInterrupted

#: method → "module:function" running that recipe on a RunFolder (imported only when used).
RUNNERS = MappingProxyType(
    {
        "hsi": "finesteer.recipes.hsi:run",
        "ships": "finesteer.recipes.ships:run",
        "refusal-heads": "finesteer.recipes.refusal_heads:run",
        "sta": "finesteer.recipes.sta:run",
        "frontier": "finesteer.recipes.frontier:run",
    }
)


def runner_for(method: str) -> Callable[..., dict[str, Any]]:
    module, function = RUNNERS[method].split(":")
    return getattr(importlib.import_module(module), function)


def prepare(recipe: HSIRecipe | ShipsRecipe | RefusalHeadsRecipe | STARecipe) -> None:
    """Every check that can fail before the model is loaded: data names, layer and head ranges."""
    for field in ("behaviour", "attribution_data", "evaluation_data"):
        name = getattr(recipe, field, None)
        if name is not None and name not in CATALOG and not Path(name).is_file():
            raise RecipeError(f"invalid recipe: {field}: unknown dataset {name!r}; see `finesteer data list`")
    for i, path in enumerate(getattr(recipe, "eval_data", None) or []):
        try:
            load_eval_sets([path])
        except DatasetError as exc:
            raise RecipeError(f"invalid recipe: eval_data[{i}]: {exc}") from None
    check_against_model(recipe, peek_model_info(recipe.model))


def execute(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every step of the run's recipe, holding the folder's lock (a second process
    on the same folder is refused at once); returns the final metrics."""
    prepare(run.recipe)  # type: ignore[arg-type]
    with run.lock():
        return runner_for(run.recipe.method)(run, progress=progress)  # type: ignore[attr-defined]


__all__ = [
    "RUNNERS",
    "HSIRecipe",
    "RecipeError",
    "RefusalHeadsRecipe",
    "RunFolder",
    "RunResumeError",
    "STARecipe",
    "ShipsRecipe",
    "StepInterrupted",
    "execute",
    "load_recipe",
    "parse_recipe",
    "prepare",
    "runner_for",
]
