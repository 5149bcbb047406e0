"""Steering methods behind one interface (`Method`), in one registry shared by every experiment.

`fit_method("caa", lm, data, {"layers": [8]})` resolves a name, checks its settings (a typed,
frozen `Settings` per method: unknown keys are rejected when constructed) and returns a `Steering`.
"""

from __future__ import annotations

from finesteer.methods.base import Method, MethodSettings
from finesteer.methods.data import BehaviourData, ContrastData, ab_triples, load_behaviour_data
from finesteer.methods.errors import MethodError
from finesteer.methods.registry import (
    ALIASES,
    METHODS,
    MethodChoice,
    fit_method,
    method_names,
    resolve_method,
)

__all__ = [
    "ALIASES",
    "METHODS",
    "BehaviourData",
    "ContrastData",
    "Method",
    "MethodChoice",
    "MethodError",
    "MethodSettings",
    "ab_triples",
    "fit_method",
    "load_behaviour_data",
    "method_names",
    "resolve_method",
]
