"""Where finesteer keeps things on disk (converted models, downloaded wheels)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Environment variable that overrides the cache location (tests, shared CI caches).
CACHE_ENV_VAR = "FINESTEER_CACHE"


def cache_root() -> Path:
    """Return the finesteer cache directory: ``$FINESTEER_CACHE`` if set, else the platform cache dir.

    Resolved on every call (not at import) so tests and users can change the variable at runtime.
    The directory is not created here; writers create what they need.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("finesteer"))


def write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
