"""Loading models and describing where their heads live."""

from finesteer.models.adapters import ADAPTERS, ArchitectureAdapter, UnsupportedArchitectureError, adapter_for
from finesteer.models.info import ModelInfo
from finesteer.models.loading import (
    LoadedModel,
    ModelLoadError,
    describe_model,
    load_model,
    peek_fingerprint,
    peek_model_info,
    unpack_model,
    wrap_model,
)

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "adapter_for",
    "describe_model",
    "load_model",
    "peek_fingerprint",
    "peek_model_info",
    "unpack_model",
    "wrap_model",
]
