"""Where finesteer keeps things on disk (converted models, downloaded wheels)."""

from __future__ import annotations

import os
from pathlib import Path

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
