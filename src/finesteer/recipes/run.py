"""Run folders: everything a run produced, plus what is needed to trust and repeat it.

A run is a list of named steps. Each step writes its files into `steps/<name>/` and returns a small
JSON-able result; when it finishes, the result is written atomically and the step is marked done in
`run.json`. Resuming a run re-enters the same folder and skips done steps, so a killed run continues
where it stopped and ends with the same results as an uninterrupted one (steps are deterministic:
greedy decoding, fixed seeds).

Nothing is resumed from other inputs: `run.json` keeps the sha256 of `recipe.yaml` (a resume after
the file was edited is refused), a recipe given with `--resume` must equal the stored one, and the
model fingerprint and data hashes a step records (`pin`) must equal those of the first session. The
folder is locked (`finesteer.runs.FolderLock`) while a process runs it, and every read-modify-write
of `run.json` holds the lock, so two processes can neither redo the same steps nor corrupt it.
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
from finesteer.errors import FinesteerError
from finesteer.recipes.config import RecipeBase, dump_recipe, load_recipe
from finesteer.runs import METRICS_JSON, RECIPE_YAML, RESULT_JSON, RUN_JSON, STEPS_DIR, write_json_atomic
from finesteer.runs.lock import FolderLock, check_writable
from finesteer.runs.manifest import RunManifest

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "safetensors", "numpy", "scikit-learn", "peft", "finesteer")


class StepInterrupted(RuntimeError):
    """Raised by `stop_after` to simulate a killed run in tests."""


class RunResumeError(FinesteerError, ValueError):
    """A resume that would mix inputs: an edited recipe.yaml, another recipe, model or data."""


def recipe_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _manifest(recipe: RecipeBase) -> RunManifest:
    return RunManifest("run", model=recipe.model, settings=recipe.model_dump(mode="json"))


@dataclass
class RunFolder:
    path: Path
    recipe: RecipeBase
    stop_after: str | None = None

    @classmethod
    def create(cls, root: Path, recipe: RecipeBase, command: str, *, folder: Path | None = None) -> RunFolder:
        path = folder or root / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_writable(path)
        with FolderLock(path):
            return cls._create(path, recipe, command)

    @classmethod
    def _create(cls, path: Path, recipe: RecipeBase, command: str) -> RunFolder:
        if (path / RUN_JSON).exists():
            raise FileExistsError(
                f"{path} already holds a run; resume it with `finesteer run --resume {path}`"
            )
        (path / STEPS_DIR).mkdir(parents=True, exist_ok=True)
        text = dump_recipe(recipe)
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
                "recipe_sha256": recipe_sha256(text),
                "manifest": _manifest(recipe).to_json(),
            },
        )
        (path / RECIPE_YAML).write_text(text)
        return cls(path, recipe)

    @classmethod
    def open(cls, path: Path, recipe: RecipeBase | None = None) -> RunFolder:
        """Re-open a run folder; refused when its recipe.yaml was edited since the run started, or
        when `recipe` (the one given with `--resume`) differs from the stored one (naming the fields)."""
        if not (path / RUN_JSON).is_file() or not (path / RECIPE_YAML).is_file():
            raise FileNotFoundError(f"{path} is not a finesteer run folder (no {RUN_JSON} / {RECIPE_YAML})")
        run = cls(path, load_recipe(path / RECIPE_YAML))
        stored_sha = run.state.get("recipe_sha256")
        if stored_sha is not None and stored_sha != recipe_sha256((path / RECIPE_YAML).read_text()):
            raise RunResumeError(
                f"{path / RECIPE_YAML} was edited after the run started; its steps were made with the "
                "original recipe — start a new run with the edited recipe instead of resuming"
            )
        if recipe is not None:
            changed = _manifest(recipe).differences(_manifest(run.recipe).to_json())
            if changed:
                raise RunResumeError(
                    f"the recipe given differs from the one {path} was started with "
                    f"({'; '.join(changed)}); resume without a recipe, or start a new run"
                )
        return run

    def lock(self) -> FolderLock:
        """The folder's lock (`with run.lock(): ...`): held while a process runs or updates the folder."""
        return FolderLock(self.path)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / RUN_JSON).read_text())

    def update(self, **fields: Any) -> None:
        """Merge `fields` into run.json (dicts one level deep), holding the folder's lock."""
        with self.lock():
            state = self.state
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(state.get(key), dict):
                    state[key].update(value)
                else:
                    state[key] = value
            write_json_atomic(self.path / RUN_JSON, state)

    def pin(self, **fields: Any) -> None:
        """Record inputs (model fingerprint, data hashes) on the first session; on a resume refuse any
        that differ from those recorded (a re-converted model, another data set under the same name)."""
        state = self.state
        changed = []
        for key, value in fields.items():
            old = state.get(key)
            new = json.loads(json.dumps(value, default=str))
            if isinstance(old, dict) and isinstance(new, dict):
                changed += [f"{key}.{k}" for k in new if k in old and old[k] != new[k]]
            elif old not in (None, {}) and old != new:
                changed.append(key)
        if changed:
            raise RunResumeError(
                f"{self.path} was started with other inputs ({', '.join(sorted(changed))} differ); "
                "its finished steps cannot be mixed with these — start a new run"
            )
        self.update(**fields)

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
