"""Named interventions the server can apply, loaded from `finesteer fit` / `save_intervention` folders.

Every entry is checked against the served model when it is loaded (shape, and the weights'
fingerprint unless the operator allows other weights), so a request can never apply an artifact made
for another model. Folders may also hold a `Steering` record (`steering.json`: a system prompt, or a
prompt-only steering without intervention); both kinds load. Loading through the HTTP API is refused
unless the operator named directories the folder must lie in.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesteer.artifacts import SPEC_FILE, ArtifactError, load_intervention
from finesteer.errors import FinesteerError
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.serve.errors import ServeError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Intervention names: no ':' or '+' (they separate names in `MODEL:a+b`)."""


@dataclass(frozen=True)
class Entry:
    """One loaded intervention (or prompt-only steering) and where it came from."""

    name: str
    intervention: Intervention | None
    system_prompt: str | None
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        iv = self.intervention
        return {
            "name": self.name,
            "object": "intervention",
            "source": self.source,
            "digest": iv.digest() if iv is not None else None,
            "edits": len(iv) if iv is not None else 0,
            "sites": [site.name for site in iv.sites] if iv is not None else [],
            "system_prompt": self.system_prompt,
            "metadata": self.metadata,
        }


class InterventionRegistry:
    """name → Entry, safe to use from the request threads while the engine runs."""

    def __init__(
        self, lm: LoadedModel, *, allow_dirs: list[Path] | None = None, allow_other_weights: bool = False
    ) -> None:
        self.lm = lm
        self.allow_dirs = [Path(d).expanduser().resolve() for d in (allow_dirs or [])]
        self.allow_other_weights = allow_other_weights
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[Entry]:
        with self._lock:
            return [self._entries[name] for name in sorted(self._entries)]

    def get(self, name: str) -> Entry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self.names()) or "none loaded"
            raise ServeError(
                f"unknown intervention '{name}' (known: {known})",
                400,
                code="unknown_intervention",
                param="intervention",
            )
        return entry

    def add(
        self,
        name: str,
        intervention: Intervention | None,
        *,
        system_prompt: str | None = None,
        source: str = "<memory>",
        metadata: dict[str, Any] | None = None,
        replace: bool = True,
    ) -> Entry:
        """Register an in-memory intervention (validated against the model)."""
        self._check_name(name)
        if intervention is not None:
            try:
                intervention.validate(self.lm.info)
            except FinesteerError as exc:
                raise ServeError(
                    f"intervention '{name}' does not fit {self.lm.name}: {exc}", 400, code="model_mismatch"
                ) from exc
        entry = Entry(name, intervention, system_prompt, source, dict(metadata or {}))
        with self._lock:
            if not replace and name in self._entries:
                raise ServeError(
                    f"intervention '{name}' is already loaded; DELETE it first",
                    409,
                    code="already_loaded",
                    param="name",
                )
            self._entries[name] = entry
        return entry

    def load(self, name: str, folder: str | Path, *, via_api: bool = False) -> Entry:
        """Load an artifact / steering folder under `name`; API loads must lie in an allowed dir."""
        self._check_name(name)
        path = Path(folder).expanduser()
        if via_api:
            path = self._allowed(path)
        if not path.is_dir():
            raise ServeError(f"{folder}: no such artifact folder", 400, code="not_found", param="path")
        try:
            steering = Steering.load(path)
            metadata: dict[str, Any] = dict(steering.metadata)
            if (path / SPEC_FILE).is_file():
                artifact = load_intervention(path)
                artifact.check_model(self.lm, strict=not self.allow_other_weights)
                metadata = {"model": artifact.model_name, **artifact.metadata}
        except ArtifactError as exc:
            raise ServeError(
                str(exc),
                400,
                code="model_mismatch" if "made for" in str(exc) else "invalid_artifact",
                param="path",
            ) from exc
        except FinesteerError as exc:
            raise ServeError(f"{folder}: {exc}", 400, code="invalid_artifact", param="path") from exc
        return self.add(
            name,
            steering.intervention,
            system_prompt=steering.system_prompt,
            source=str(path),
            metadata=metadata,
            replace=not via_api,
        )

    def remove(self, name: str) -> Entry:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise ServeError(f"unknown intervention '{name}'", 404, code="unknown_intervention")
        return entry

    def _check_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ServeError(
                f"bad intervention name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)",
                400,
                code="invalid_name",
                param="name",
            )

    def _allowed(self, path: Path) -> Path:
        if not self.allow_dirs:
            raise ServeError(
                "loading interventions from a path is off; start the server with --allow-dir DIR",
                403,
                code="path_loading_disabled",
                param="path",
            )
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.allow_dirs):
            raise ServeError(
                f"{path} is outside the allowed directories", 403, code="path_not_allowed", param="path"
            )
        return resolved
