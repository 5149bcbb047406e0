"""`Steering`: the one result type of every fitted steering method.

A steering is what a method hands to an evaluation: an optional intervention (edits applied with
`finesteer.interventions.intervene`), an optional system prompt, optionally the model it runs on
(a fine-tuned copy for LoRA, the fitted model otherwise), and JSON-able provenance (`metadata`:
what was chosen and why). It replaces the former `FittedIntervention` (fit functions) and
`SteeringSetup` (comparisons) pair; `.scaled(m)` is the λ sweep, `.key()` the resume identity,
`.save(folder)` the artifact writer and `.apply(lm)` the context manager that steers a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.artifacts import SPEC_FILE, load_intervention, save_intervention
from finesteer.errors import FinesteerError
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention

# TODO(coordinator): use Intervention.digest() / scoring's digest once lowlayers and scoring merge.

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

STEERING_FILE = "steering.json"
"""Written by `Steering.save` next to the intervention artifact: name, system prompt, metadata."""


class SteeringError(FinesteerError, ValueError):
    """A steering that cannot be saved, loaded or applied (no model given, missing files)."""


@dataclass(frozen=True, eq=False)
class Steering:
    """A fitted steering: name, optional intervention, metadata; optional system prompt and model.

    `lm` is the model the steering runs on when it is bound to one (a method's `fit` binds the
    model it fitted on; LoRA binds its fine-tuned copy). Fit functions may leave it unset.
    """

    name: str
    intervention: Intervention | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    system_prompt: str | None = None
    lm: LoadedModel | None = field(default=None, repr=False, compare=False)

    def __eq__(self, other: object) -> bool:
        """Same name, metadata, system prompt and intervention content (tensors compared by digest)."""
        if not isinstance(other, Steering):
            return NotImplemented
        def parts(s: Steering) -> tuple[Any, ...]:
            digest = s.intervention.digest() if s.intervention is not None else "none"
            return (s.name, s.metadata, s.system_prompt, digest)

        return parts(self) == parts(other)

    __hash__ = object.__hash__

    # --- derived steerings ------------------------------------------------------------------------

    def renamed(self, name: str) -> Steering:
        return replace(self, name=name)

    def bound(self, lm: LoadedModel) -> Steering:
        """The same steering, running on `lm`."""
        return replace(self, lm=lm)

    def scaled(self, multiplier: float, *, name: str | None = None) -> Steering:
        """Every edit's strength × `multiplier` (the λ sweep); metadata records the new multiplier.

        The recorded multiplier is the old one (1 when absent) × `multiplier`.
        """
        if self.intervention is None:
            raise SteeringError(f"steering '{self.name}' has no intervention to scale")
        base = float(self.metadata.get("multiplier", 1.0))
        return replace(
            self,
            name=name if name is not None else self.name,
            intervention=self.intervention.scaled(multiplier),
            metadata={**self.metadata, "multiplier": base * float(multiplier)},
        )

    # --- identity ---------------------------------------------------------------------------------

    def identity(self, lm: LoadedModel | None = None) -> dict[str, Any]:
        """What makes two steerings the same for resuming: weights, intervention, system prompt."""
        model = self.model(lm)
        return {
            "model": model.name,
            "fingerprint": model.fingerprint,
            "intervention": self.intervention.digest() if self.intervention is not None else "none",
            "system_prompt": self.system_prompt,
        }

    def key(self, lm: LoadedModel | None = None) -> str:
        """A stable short hash of `identity()` (16 hex digits)."""
        text = json.dumps(self.identity(lm), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --- use --------------------------------------------------------------------------------------

    def model(self, lm: LoadedModel | None = None) -> LoadedModel:
        """The model this steering runs on: `lm` if given, else the bound one."""
        model = lm if lm is not None else self.lm
        if model is None:
            raise SteeringError(f"steering '{self.name}' is bound to no model; pass one")
        return model

    @contextmanager
    def apply(self, lm: LoadedModel | None = None) -> Iterator[LoadedModel]:
        """Steer `lm` (default: the bound model) inside the block; yields the model to run.

        The system prompt is not applied here (it belongs to the prompt): format prompts with
        `steering.system_prompt`. Hooks are removed on exit, also after an exception.
        """
        model = self.model(lm)
        if self.intervention is None:
            yield model
            return
        with intervene(model, self.intervention):
            yield model

    def save(self, folder: str | Path, lm: LoadedModel | None = None) -> Path:
        """Write a `finesteer.load_intervention`-compatible artifact (method name in its metadata).

        With an intervention the folder is a plain intervention artifact; a system prompt, or no
        intervention at all, adds `steering.json` (`Steering.load` reads both back).
        """
        folder = Path(folder)
        meta = {"method": self.name, **self.metadata}
        if self.intervention is not None:
            save_intervention(folder, self.intervention, self.model(lm), metadata=meta)
        if self.intervention is None or self.system_prompt is not None:
            folder.mkdir(parents=True, exist_ok=True)
            record = {"name": self.name, "system_prompt": self.system_prompt, "metadata": self.metadata}
            (folder / STEERING_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None) -> Steering:
        """A steering written by `save` (or any intervention artifact), bound to `lm` if given."""
        folder = Path(folder)
        record_path = folder / STEERING_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        intervention = None
        metadata: dict[str, Any] = {}
        if (folder / SPEC_FILE).is_file():
            artifact = load_intervention(folder)
            intervention = artifact.intervention
            metadata = dict(artifact.metadata)
        elif record is None:
            raise SteeringError(f"{folder} holds no steering ({STEERING_FILE} or an intervention artifact)")
        name = str(metadata.pop("method", folder.name))
        if record is not None:
            name, metadata = record["name"], dict(record["metadata"])
        return cls(
            name,
            intervention,
            metadata,
            system_prompt=record.get("system_prompt") if record else None,
            lm=lm,
        )


__all__ = ["STEERING_FILE", "Steering", "SteeringError"]
