"""Run folders on disk: file names, the cache location and the atomic writers every result goes through."""

from finesteer.runs.files import (
    CACHE_ENV_VAR,
    METRICS_JSON,
    RECIPE_YAML,
    RESULT_JSON,
    RUN_JSON,
    STEPS_DIR,
    cache_root,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_safetensors_atomic,
)

__all__ = [
    "CACHE_ENV_VAR",
    "METRICS_JSON",
    "RECIPE_YAML",
    "RESULT_JSON",
    "RUN_JSON",
    "STEPS_DIR",
    "cache_root",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_safetensors_atomic",
]
