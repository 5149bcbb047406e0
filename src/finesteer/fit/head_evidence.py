"""What HSI and ITI record beside their chosen heads: matched random-head controls for every candidate
of the selection, and the chosen heads' direction diagnostics (with a warning when they are low).

The controls feed `finesteer.methods.verdict`, which accepts a selection only if it beats its
control after accounting for every candidate tried; the diagnostics (Braun et al. 2025, see
`finesteer.activations.diagnostics`) say before steering whether a head's direction is one the
items agree on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from finesteer.activations.directions import HeadDirections
from finesteer.fit.controls import random_head_control
from finesteer.interventions.edit import Intervention
from finesteer.locate.selection import ControlBuilder
from finesteer.sites import Head

log = logging.getLogger(__name__)


def random_head_builder(directions: HeadDirections, exclude: Sequence[Head]) -> ControlBuilder:
    """(heads, α, seed) → as many random heads (none of `exclude`) at the same α in their own σ."""

    def build(heads: Sequence[Head], alpha: float, seed: int) -> Intervention:
        return random_head_control(directions, list(heads), alpha, seed, exclude=exclude).intervention

    return build


def head_diagnostics(directions: HeadDirections, heads: Sequence[Head], what: str = "HSI") -> dict[str, Any]:
    """The heads' consistency, d′ and AUROC, and the warnings for low ones (also logged, so they
    reach the terminal); empty when the directions carry no diagnostics."""
    diagnostics = directions.diagnostics
    if diagnostics is None:
        return {}
    warnings = diagnostics.warnings(heads)
    for line in warnings:
        log.warning("%s %s", what, line)
    return {
        "heads": [{"layer": int(layer), "head": int(h), **diagnostics.at(layer, h)} for layer, h in heads],
        "warnings": warnings,
        "paired": diagnostics.paired,
    }


__all__ = ["head_diagnostics", "random_head_builder"]
