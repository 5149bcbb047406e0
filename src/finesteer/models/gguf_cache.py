"""A user's own .gguf file, converted once to an fp32 HF folder in the cache, like registry models.

Loading a GGUF de-quantises every tensor (tens of seconds for a 0.5B model); the converted folder is
kept under `<cache>/user-gguf/`, keyed by the file's resolved path, size and modification time, so a
second load reads safetensors. The GGUF's sha256 is computed once, at conversion, and kept next to
the folder: it is the model's fingerprint (equal to a registry pin when the weights are the same),
so the artifact/model match check also runs for GGUF files, before loading when a conversion exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from finesteer.models.cache import file_sha256, verify_folder, write_manifest
from finesteer.models.convert import load_gguf_fp32, save_plain_folder
from finesteer.runs.files import cache_root

log = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"
USER_GGUF_DIR = "user-gguf"


def _stamp(gguf: Path) -> dict[str, Any]:
    """What identifies this version of the file without reading it: path, size, mtime."""
    stat = gguf.stat()
    return {"path": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_folder(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the conversion of this version of `gguf` lives."""
    stamp = _stamp(gguf)
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)[:60]
    return (cache_dir or cache_root()) / USER_GGUF_DIR / f"{stem}-{key}"


def _read_source(folder: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def cached_conversion(gguf: Path, cache_dir: Path | None = None) -> tuple[Path, str] | None:
    """(folder, fingerprint) of a complete conversion of this version of `gguf`, or None."""
    folder = cache_folder(gguf, cache_dir)
    source = _read_source(folder)
    if source is None or source.get("stamp") != _stamp(gguf) or not isinstance(source.get("sha256"), str):
        return None
    if verify_folder(folder, full_hash=False):  # sizes against the manifest: a damaged copy is redone
        return None
    return folder, str(source["sha256"])


def gguf_fingerprint(gguf: Path, cache_dir: Path | None = None) -> str:
    """The GGUF's sha256: from its conversion when there is one, else hashed now."""
    cached = cached_conversion(gguf, cache_dir)
    return cached[1] if cached is not None else file_sha256(gguf)


def convert_user_gguf(
    gguf: Path, cache_dir: Path | None = None, *, progress: bool = False
) -> tuple[Path, str]:
    """(folder, fingerprint): the cached fp32 HF folder of `gguf`, converted now if it is not there.

    The conversion is written to a work folder and moved into place with one `os.replace`, so an
    interrupted conversion never looks complete.
    """
    cached = cached_conversion(gguf, cache_dir)
    if cached is not None:
        return cached
    final = cache_folder(gguf, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sha256 = file_sha256(gguf)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model, tokenizer = load_gguf_fp32(gguf, str(gguf), progress=progress)
        staged = work / "hf"
        save_plain_folder(model, tokenizer, staged)
        del model
        (staged / SOURCE_FILE).write_text(json.dumps({"stamp": _stamp(gguf), "sha256": sha256}, indent=1))
        write_manifest(staged)
        if final.exists():  # an outdated or damaged conversion: moved aside, removed with the work dir
            os.replace(final, work / "outdated")
        os.replace(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("converted %s once into %s (%.1fs); later loads read the folder", gguf, final, seconds)
    return final, sha256
