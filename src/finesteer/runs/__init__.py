"""Run folders on disk: file names, the cache location, the atomic writers every result goes through,
folder locks and the manifest a resume is checked against."""

from finesteer.runs.files import (
    CACHE_ENV_VAR,
    METRICS_JSON,
    RECIPE_YAML,
    RESULT_JSON,
    RUN_JSON,
    STEPS_DIR,
    cache_root,
    read_json_object,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_safetensors_atomic,
)
from finesteer.runs.lock import FolderLock, FolderLockedError, OutputFolderError, check_writable
from finesteer.runs.manifest import (
    MANIFEST_JSON,
    ManifestError,
    RunManifest,
    check_manifest,
    content_hash,
)

__all__ = [
    "CACHE_ENV_VAR",
    "MANIFEST_JSON",
    "METRICS_JSON",
    "RECIPE_YAML",
    "RESULT_JSON",
    "RUN_JSON",
    "STEPS_DIR",
    "FolderLock",
    "FolderLockedError",
    "ManifestError",
    "OutputFolderError",
    "RunManifest",
    "cache_root",
    "check_manifest",
    "check_writable",
    "content_hash",
    "read_json_object",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_safetensors_atomic",
]
