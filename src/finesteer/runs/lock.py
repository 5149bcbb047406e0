"""Output folders: checked writable before any work, and locked while a process writes them.

`check_writable(folder)` fails at once (before a model is loaded or anything is fitted) when the
folder is a file, lies under a file, or cannot be written. `FolderLock(folder)` holds
`<folder>/.finesteer.lock` (the `filelock` package, non-blocking): a second writer — another
process or another thread — gets `FolderLockedError` at once instead of interleaving rows with
the first. The lock is re-entrant within one thread, so a library call that locks its folder may
call another that locks the same folder (an ablation writing its generations into its run folder).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from types import TracebackType

from finesteer.errors import FinesteerError

LOCK_FILE = ".finesteer.lock"


class OutputFolderError(FinesteerError, OSError):
    """An output folder that cannot be written: it is a file, lies under one, or is read-only."""


class FolderLockedError(FinesteerError, RuntimeError):
    """Another process (or thread) is writing the folder right now."""


def check_writable(folder: str | Path) -> Path:
    """`folder` as a Path, after checking it (or, if it does not exist yet, its nearest existing
    parent) is a folder this process can create files in. Creates nothing that stays."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output folder {folder} is a file; choose another --out")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"output folder {folder}: {existing} is a file, not a folder")
    probe = existing / f".finesteer-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(
            f"output folder {folder}: cannot write in {existing} ({exc.strerror or exc})"
        ) from exc
    return folder


class FolderLock:
    """`with FolderLock(folder): ...` — create `folder` and hold its lock, or fail at once.

    Raises `FolderLockedError` naming the folder when another writer holds it, and
    `OutputFolderError` when the folder cannot be written.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._lock = None

    def acquire(self) -> FolderLock:
        from filelock import FileLock, Timeout  # here: `finesteer.runs` imports without filelock loaded

        check_writable(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=0, is_singleton=True)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            raise FolderLockedError(
                f"{self.folder} is being written by another finesteer process; wait for it to "
                f"finish or choose another output folder (lock: {self.path})"
            ) from None
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


__all__ = ["LOCK_FILE", "FolderLock", "FolderLockedError", "OutputFolderError", "check_writable"]
