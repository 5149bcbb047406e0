"""What a converted registry folder records about itself, how it is checked, and model fingerprints.

Every converted folder holds two finesteer files next to the HF files:

- ``finesteer_source.json``: provenance (registry name, pinned GGUF sha256, packages, versions).
- ``finesteer_manifest.json``: the size and sha256 of every other file in the folder (the source file
  included), recorded right after conversion.

A folder is trusted only as far as its manifest verifies: sizes always, the full sha256 of every file by
default (``FINESTEER_VERIFY_CACHE=size`` skips the hashing). The fingerprint of a registry folder is the
pinned GGUF sha256 only when the folder verifies; otherwise it is a hash of the folder's actual content,
so an artifact's fingerprint check notices changed weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from finesteer.models.registry import RegistryEntry

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILENAME",
    "SOURCE_FILENAME",
    "VERIFY_ENV_VAR",
    "file_sha256",
    "full_hash_default",
    "is_current",
    "model_fingerprint",
    "read_source",
    "verify_folder",
    "write_manifest",
    "write_source",
]

logger = logging.getLogger(__name__)

#: Provenance file written into every converted folder.
SOURCE_FILENAME = "finesteer_source.json"
#: Size + sha256 of every file of a converted folder; written last, so it marks the folder complete.
MANIFEST_FILENAME = "finesteer_manifest.json"
#: Bumped when the folder layout or conversion changes in a way that needs a re-conversion. Folders
#: converted before the manifest existed keep version 2 but lack the manifest, so they are converted
#: again once (older finesteer versions still accept the new folders: the manifest is just one more file).
FORMAT_VERSION = 2
#: ``size`` checks only file sizes on load; anything else (the default) also checks every sha256.
VERIFY_ENV_VAR = "FINESTEER_VERIFY_CACHE"

_CHUNK = 4 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_FINGERPRINT_EDGE = 1024 * 1024


def full_hash_default() -> bool:
    """Whether loads hash every cached file (the default) or only compare sizes (``$FINESTEER_VERIFY_CACHE``
    set to ``size``)."""
    return os.environ.get(VERIFY_ENV_VAR, "full").strip().lower() != "size"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- source


def write_source(out_dir: Path, entry: RegistryEntry) -> None:
    import torch
    import transformers

    source = {
        "name": entry.name,
        "gguf_sha256": entry.gguf_sha256,
        "packages": list(entry.packages),
        "members": list(entry.members),
        "architecture": entry.architecture,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / SOURCE_FILENAME).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def read_source(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SOURCE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(folder: Path, entry: RegistryEntry) -> bool:
    """Provenance matches the current pin and format, and a manifest exists (nothing is hashed here)."""
    source = read_source(folder)
    return (
        source is not None
        and source.get("gguf_sha256") == entry.gguf_sha256
        and source.get("format_version") == FORMAT_VERSION
        and (folder / "config.json").is_file()
        and (folder / MANIFEST_FILENAME).is_file()
        and any(folder.glob("*.safetensors"))
    )


# --------------------------------------------------------------------------------------------- manifest


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILENAME)


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Record size and sha256 of every file in ``folder`` (call it once the folder is complete)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _folder_files(folder)
    }
    manifest = {"format": 1, "files": files}
    (folder / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return files


def verify_folder(folder: Path, *, full_hash: bool | None = None) -> list[str]:
    """What differs between ``folder`` and its manifest (empty when it verifies).

    Sizes are always compared and missing or extra files reported; with ``full_hash`` (default:
    :func:`full_hash_default`) every file's sha256 is recomputed too.
    """
    full_hash = full_hash_default() if full_hash is None else full_hash
    try:
        manifest = json.loads((folder / MANIFEST_FILENAME).read_text(encoding="utf-8"))
        recorded = manifest["files"]
        if not isinstance(recorded, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return [f"no {MANIFEST_FILENAME}"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"unreadable {MANIFEST_FILENAME} ({exc})"]
    problems: list[str] = []
    present = {p.relative_to(folder).as_posix(): p for p in _folder_files(folder)}
    for name in sorted(set(present) - set(recorded)):
        problems.append(f"{name}: not in the manifest")
    for name, expected in sorted(recorded.items()):
        path = present.get(name)
        if path is None:
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            problems.append(f"{name}: {size} bytes, expected {expected.get('size')}")
        elif full_hash and file_sha256(path) != expected.get("sha256"):
            problems.append(f"{name}: sha256 differs from the one recorded at conversion")
    return problems


# --------------------------------------------------------------------------------------------- fingerprint


def _edge_digest(path: Path, size: int) -> tuple[str, str]:
    with path.open("rb") as fh:
        head = hashlib.sha256(fh.read(_FINGERPRINT_EDGE)).hexdigest()
        fh.seek(max(0, size - _FINGERPRINT_EDGE))
        tail = hashlib.sha256(fh.read(_FINGERPRINT_EDGE)).hexdigest()
    return head, tail


def model_fingerprint(folder: Path, *, full_hash: bool | None = None) -> str:
    """A stable hex id for the weights in ``folder``, for tagging cached results (e.g. head scores).

    Registry folders return the recorded sha256 of the source GGUF, but only when the folder verifies
    against its manifest (``full_hash`` as in :func:`verify_folder`): then it is the true identity of
    the weights. Other folders, and registry folders that do not verify, hash config.json's bytes plus,
    for each weight file (sorted by name), its name, its size and the sha256 of its first and last
    1 MiB. Hashing whole multi-GB files would take seconds to minutes on every call; the edges plus the
    exact size change whenever a checkpoint is re-saved or swapped in practice, but an in-place edit of
    middle bytes with the same size would go unnoticed — acceptable for a cache key, not for security.
    """
    folder = Path(folder)
    source = read_source(folder)
    if source is not None and isinstance(source.get("gguf_sha256"), str):
        problems = verify_folder(folder, full_hash=full_hash)
        if not problems:
            return str(source["gguf_sha256"])
        logger.warning(
            "%s does not match its manifest (%s); its fingerprint is computed from its files, not the pin",
            folder,
            "; ".join(problems[:3]),
        )

    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not config.is_file() and not weights:
        raise FileNotFoundError(f"{folder} has neither config.json nor weight files; not a model folder")
    digest = hashlib.sha256(b"finesteer-fingerprint-v1\0")
    if config.is_file():
        digest.update(b"config.json\0" + config.read_bytes() + b"\0")
    for path in weights:
        size = path.stat().st_size
        head, tail = _edge_digest(path, size)
        digest.update(f"{path.name}\0{size}\0{head}\0{tail}\0".encode())
    return digest.hexdigest()
