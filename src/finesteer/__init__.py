"""finesteer: find where a behaviour lives in a transformer (heads, SAE atoms) and change it there.

The top-level names are imported lazily so `import finesteer` stays fast (no torch/transformers
until something is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "finesteer.models",
    "LoadedModel": "finesteer.models",
    "ModelInfo": "finesteer.models",
    "Site": "finesteer.sites",
    "Intervention": "finesteer.interventions",
    "Edit": "finesteer.interventions",
    "Scope": "finesteer.interventions",
    "intervene": "finesteer.interventions",
    "steer_head": "finesteer.interventions",
    "steer_residual": "finesteer.interventions",
    "ablate_head": "finesteer.interventions",
    "ablate_heads": "finesteer.interventions",
    "project_out": "finesteer.interventions",
    "Activations": "finesteer.capture",
    "save_intervention": "finesteer.artifacts",
    "load_intervention": "finesteer.artifacts",
    "generate": "finesteer.generation",
}

# Subpackages exported under their own name: `finesteer.capture` is the package, callable as the
# capture function (see finesteer/capture/__init__.py).
_SUBPACKAGES = frozenset({"capture"})

__all__ = ["__version__", *_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'finesteer' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
