"""Run folders: everything a run produced, plus what is needed to trust and repeat it.

A run is a list of named steps. Each step writes its files into `steps/<name>/` and returns a small
JSON-able result; when it finishes, the result is written atomically and the step is marked done in
`run.json`. Resuming a run re-enters the same folder and skips done steps, so a killed run continues
where it stopped and ends with the same results as an uninterrupted one (steps are deterministic:
greedy decoding, fixed seeds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from finesteer import __version__
from finesteer.recipes.config import RecipeBase, dump_recipe, load_recipe
from finesteer.runs import METRICS_JSON, RECIPE_YAML, RESULT_JSON, RUN_JSON, STEPS_DIR, write_json_atomic

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "safetensors", "numpy", "scikit-learn", "peft", "finesteer")


class StepInterrupted(RuntimeError):
    """Raised by `stop_after` to simulate a killed run in tests."""


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


def data_hash(rows: list[Any]) -> str:
    """sha256 of the exact rows a step used (as JSON), recorded so results can be tied to data."""
    blob = json.dumps(rows, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class RunFolder:
    path: Path
    recipe: RecipeBase
    stop_after: str | None = None

    @classmethod
    def create(cls, root: Path, recipe: RecipeBase, command: str, *, folder: Path | None = None) -> RunFolder:
        path = folder or root / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (path / RUN_JSON).exists():
            raise FileExistsError(
                f"{path} already holds a run; resume it with `finesteer run --resume {path}`"
            )
        (path / STEPS_DIR).mkdir(parents=True, exist_ok=True)
        (path / RECIPE_YAML).write_text(dump_recipe(recipe))
        write_json_atomic(
            path / RUN_JSON,
            {
                "status": "running",
                "method": recipe.method,  # type: ignore[attr-defined]
                "name": recipe.name,
                "model": recipe.model,
                "command": command,
                "resume_command": f"finesteer run --resume {path}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "finesteer_version": __version__,
                "environment": environment(),
                "steps": {},
                "data_hashes": {},
            },
        )
        return cls(path, recipe)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        if not (path / RUN_JSON).is_file() or not (path / RECIPE_YAML).is_file():
            raise FileNotFoundError(f"{path} is not a finesteer run folder (no {RUN_JSON} / {RECIPE_YAML})")
        return cls(path, load_recipe(path / RECIPE_YAML))

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / RUN_JSON).read_text())

    def update(self, **fields: Any) -> None:
        state = self.state
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(state.get(key), dict):
                state[key].update(value)
            else:
                state[key] = value
        write_json_atomic(self.path / RUN_JSON, state)

    def step_dir(self, name: str) -> Path:
        folder = self.path / STEPS_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def done(self, name: str) -> bool:
        return name in self.state["steps"] and (self.path / STEPS_DIR / name / RESULT_JSON).is_file()

    def result(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / STEPS_DIR / name / RESULT_JSON).read_text())

    def step(self, name: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run `fn(step_dir)` once; on resume return the stored result without running it again."""
        if self.done(name):
            log.info("step %s: done earlier, reusing its results", name)
            return self.result(name)
        log.info("step %s …", name)
        started = time.perf_counter()
        result = fn(self.step_dir(name))
        write_json_atomic(self.step_dir(name) / RESULT_JSON, result)
        self.update(steps={name: {"seconds": round(time.perf_counter() - started, 2)}})
        if self.stop_after == name:
            raise StepInterrupted(f"stopped after step {name} (as asked)")
        return result

    def finish(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.path / METRICS_JSON, metrics)
        self.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
