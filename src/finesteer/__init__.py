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
    "capture": "finesteer.activations",
    "Activations": "finesteer.activations",
    "to_tokens": "finesteer.activations",
    "save_intervention": "finesteer.artifacts",
    "load_intervention": "finesteer.artifacts",
    "generate": "finesteer.generation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'finesteer' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
