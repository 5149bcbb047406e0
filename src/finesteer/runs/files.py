"""Where finesteer keeps things on disk, the run-folder file names, and the one way to write a file.

Every result file is written atomically: the data goes to a temp file with a unique name in the
same folder, is fsynced, then `os.replace`d onto the target. A killed run leaves either the old
file or the new one, never half a file, and two writers of the same file never share a temp file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

#: Environment variable that overrides the cache location (tests, shared CI caches).
CACHE_ENV_VAR = "FINESTEER_CACHE"

#: A run folder's state: settings, finished steps and their outputs.
RUN_JSON = "run.json"
#: The recipe a run folder was started from.
RECIPE_YAML = "recipe.yaml"
#: A finished run's headline numbers.
METRICS_JSON = "metrics.json"
#: The sub-folder holding one folder per step, each with its RESULT_JSON.
STEPS_DIR = "steps"
RESULT_JSON = "result.json"


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


def read_json_object(path: Path, error: Callable[[str], Exception], *, hint: str = "") -> dict[str, Any]:
    """The JSON object stored at `path`. Invalid JSON or another JSON type raises `error(message)`
    naming the file (and `hint`, what the user can do about it)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: invalid JSON ({exc}){hint}") from exc
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got a JSON {type(value).__name__}{hint}")
    return value


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a unique temp path next to `path`, fsync it, then rename it onto `path`.

    The temp name starts with a dot and ends in `.tmp`, so folder globs for results never see it;
    on any error the temp file is removed and the target is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write raw bytes atomically."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write JSON atomically (UTF-8, trailing newline; values JSON cannot hold are written with `str`)."""
    text = json.dumps(data, indent=indent, default=str) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_safetensors_atomic(
    path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically (each tensor made contiguous first)."""
    from safetensors.torch import save_file  # here, so `finesteer.runs` imports without torch

    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
