"""One portable file format for a finished intervention.

An artifact is a folder: `intervention.json` (human-readable: model, sites in TransformerLens names,
ops, scopes, scales, provenance) and `tensors.safetensors` (the vectors, keyed from the JSON). It is
what `fit` commands write and what the API, CLI and server load and apply.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from finesteer import __version__
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.ops import op_from_parts
from finesteer.interventions.scope import Scope
from finesteer.models.info import ModelInfo
from finesteer.models.loading import LoadedModel, peek_fingerprint, peek_model_info
from finesteer.runs.files import read_json_object
from finesteer.sites import Site

FORMAT = "finesteer.intervention"
FORMAT_VERSION = 1
SPEC_FILE = "intervention.json"
TENSOR_FILE = "tensors.safetensors"


class ArtifactError(FinesteerError, ValueError):
    """An artifact that is malformed, from a newer format, or made for another model."""


@dataclass
class Artifact:
    """An intervention plus the model it was fitted on and free-form metadata (method, α, data hash…)."""

    intervention: Intervention
    model_name: str
    model_fingerprint: str
    model_info: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def intervention_for(self, lm: LoadedModel, *, allow_other_weights: bool = False) -> Intervention:
        """The intervention, after checking it was made for `lm` (shape always; weights unless
        `allow_other_weights`). `intervene(lm, artifact)` and `generate(..., intervention=artifact)`
        call this, so the API refuses another model's artifact as the CLI does."""
        self.check_model(lm, strict=not allow_other_weights)
        return self.intervention

    def check_model(self, lm: LoadedModel, *, strict: bool = True) -> None:
        """Refuse to apply to a model of another shape; with strict, also to other weights."""
        self._check(lm.name, lm.info, lm.fingerprint, strict)

    def check_before_load(self, model: str, *, allow_other_weights: bool = False) -> None:
        """The same checks from the model's config and registry pin alone, before its weights load:
        shape, every edit's layer / head / vector size, and (unless allowed) the weights' fingerprint.
        Checks what can be known without loading; `check_model` after the load does the rest."""
        info = peek_model_info(model)
        if info is not None:
            self.intervention.validate(info)
        self._check(model, info, peek_fingerprint(model), not allow_other_weights)

    def _check(self, name: str, info: ModelInfo | None, fingerprint: str | None, strict: bool) -> None:
        mine = {k: v for k, v in self.model_info.items() if k != "family"}
        if info is not None:
            shape = {k: v for k, v in info.to_dict().items() if k != "family"}
            if mine and shape != mine:
                raise ArtifactError(
                    f"artifact was made for {self.model_name} {mine}; this model is {name} {shape}"
                )
        if strict and self.model_fingerprint and fingerprint and self.model_fingerprint != fingerprint:
            raise ArtifactError(
                f"artifact was made for weights {self.model_fingerprint[:12]}… ({self.model_name}); "
                f"{name} has {fingerprint[:12]}… (pass allow_other_weights=True, or "
                "--allow-other-weights, to apply it anyway)"
            )


def save_intervention(
    path: str | Path,
    intervention: Intervention,
    lm: LoadedModel | None = None,
    *,
    model_name: str = "",
    model_fingerprint: str = "",
    model_info: ModelInfo | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact folder; the model is recorded from `lm` or the explicit arguments."""
    if lm is not None:
        intervention.validate(lm.info)
        model_name, model_fingerprint, model_info = lm.name, lm.fingerprint, lm.info
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    edits = []
    for i, edit in enumerate(intervention.edits):
        keys = {}
        for name, tensor in edit.op.tensors().items():
            key = f"edit{i}.{name}"
            tensors[key] = tensor.detach().float().contiguous().cpu()
            keys[name] = key
        edits.append(
            {
                "site": edit.site.name,
                "op": edit.op.kind,
                "params": edit.op.params(),
                "tensors": keys,
                "scope": str(edit.scope),
                "rows": list(edit.rows) if edit.rows is not None else None,
            }
        )
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "finesteer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "name": model_name,
            "fingerprint": model_fingerprint,
            "info": model_info.to_dict() if model_info else {},
        },
        "edits": edits,
        "metadata": metadata or {},
    }
    save_file(tensors, str(folder / TENSOR_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def load_intervention(
    path: str | Path, model: LoadedModel | None = None, *, allow_other_weights: bool = False
) -> Artifact:
    """Read an artifact folder (or its intervention.json); errors name the file and the bad field.

    With `model`, the artifact is also checked against it (`Artifact.check_model`): another shape is
    always refused, other weights unless `allow_other_weights`."""
    artifact = _read_artifact(Path(path))
    if model is not None:
        artifact.check_model(model, strict=not allow_other_weights)
    return artifact


def _read_artifact(path: Path) -> Artifact:
    folder = Path(path)
    if folder.is_file() and folder.name == SPEC_FILE:
        folder = folder.parent
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise ArtifactError(f"{folder} is not a finesteer artifact: {SPEC_FILE} not found")
    spec = read_json_object(spec_path, ArtifactError)
    if spec.get("format") != FORMAT:
        raise ArtifactError(f"{spec_path}: not a finesteer intervention (format={spec.get('format')!r})")
    if int(spec.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(
            f"{spec_path}: format version {spec['format_version']} is newer than this finesteer supports"
        )
    tensor_path = folder / TENSOR_FILE
    try:
        tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{tensor_path}: unreadable or truncated safetensors file ({exc})") from exc
    model = spec.get("model", {})
    if not isinstance(model, dict) or not isinstance(spec.get("edits", []), list):
        raise ArtifactError(f"{spec_path}: malformed 'model' or 'edits' field")
    n_layers = model.get("info", {}).get("n_layers")
    edits = []
    for i, raw in enumerate(spec.get("edits", [])):
        try:
            op_tensors = {name: tensors[key] for name, key in raw.get("tensors", {}).items()}
            op = op_from_parts(raw["op"], raw.get("params", {}), op_tensors)
            rows = tuple(raw["rows"]) if raw.get("rows") is not None else None
            edits.append(
                Edit(Site.parse(raw["site"], n_layers), op, Scope.parse(raw.get("scope", "all")), rows)
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{spec_path}: edit {i} is malformed: {exc}") from exc
    return Artifact(
        Intervention(tuple(edits)),
        model.get("name", ""),
        model.get("fingerprint", ""),
        model.get("info", {}),
        spec.get("metadata", {}),
    )
