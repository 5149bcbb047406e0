"""What a resumable output was made from, so a resume never mixes two experiments.

Every resumable output (a `finesteer run` folder, `eval asr --out`, `locate`, `ablate`, `compare`,
`sae train`) records a `RunManifest`: the kind of output, the model fingerprint, a hash of the
data its rows come from, the settings that determine its rows and the manifest format version.
A resume compares the new manifest with the stored one and refuses any difference, naming each
changed field (`data: was 3f2a…, now 9c01…`), instead of returning the old run's rows under the
new name.

    manifest = RunManifest("eval asr", model=lm.fingerprint, data=content_hash(prompts),
                           settings={"max_new_tokens": 64})
    check_manifest(out / MANIFEST_JSON, manifest, resuming=has_rows)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.runs.files import read_json_object, write_json_atomic

#: The manifest file of a run folder.
MANIFEST_JSON = "manifest.json"
#: Version of the manifest layout (bump when the meaning of a field changes).
MANIFEST_FORMAT = 1


class ManifestError(FinesteerError, ValueError):
    """A resume whose model, data or settings differ from those the output was made with."""


def content_hash(value: Any) -> str:
    """sha256 (hex) of `value` as canonical JSON (sorted keys; values JSON cannot hold as `str`)."""
    blob = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so a difference names the exact setting."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class RunManifest:
    """Everything that determines an output's rows (see the module doc)."""

    kind: str
    model: Any = None
    data: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        # a JSON round trip, so tuples and lists compare equal to what is read back
        return json.loads(
            json.dumps(
                {
                    "kind": self.kind,
                    "format": self.format,
                    "model": self.model,
                    "data": self.data,
                    "settings": dict(self.settings),
                },
                default=str,
            )
        )

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """'key: was X, now Y' for every field that differs from `stored` (a `to_json()` dict)."""
        return differences(stored, self.to_json())


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'key: was X, now Y' for every (dotted, nested) key whose value differs between two manifests."""
    old = _flatten(json.loads(json.dumps(dict(stored), default=str)))
    new = _flatten(json.loads(json.dumps(dict(now), default=str)))
    return [
        f"{key}: was {_short(old.get(key))}, now {_short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The stored manifest, None when there is none; a corrupt file is a `ManifestError`."""
    path = Path(path)
    if not path.is_file():
        return None
    return read_json_object(path, ManifestError, hint="; delete the output folder to start over")


def check_manifest(
    path: str | Path,
    manifest: RunManifest,
    *,
    resuming: bool,
    error: type[Exception] = ManifestError,
) -> None:
    """Record `manifest` at `path`, or, when `resuming` output already there, refuse any difference.

    `resuming` says the output holds rows that would be reused: then a missing manifest is refused
    too (the rows cannot be tied to their settings). Without rows the manifest is (re)written.
    `error` is the class raised (a caller's own `ManifestError`-like subclass).
    """
    path = Path(path)
    stored = read_manifest(path)
    if not resuming or (stored is None and not path.parent.exists()):
        write_json_atomic(path, manifest.to_json())
        return
    if stored is None:
        raise error(
            f"{path.parent} holds results but no {path.name}; cannot check they come from the same "
            "model, data and settings — choose another output folder or delete it to start over"
        )
    changed = manifest.differences(stored)
    if changed:
        raise error(
            f"{path.parent} holds a run made with other inputs ({'; '.join(changed)}); "
            "choose another output folder, or delete it to start over"
        )


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_JSON",
    "ManifestError",
    "RunManifest",
    "check_manifest",
    "content_hash",
    "differences",
    "read_manifest",
]
