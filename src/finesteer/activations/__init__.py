"""Reading activations: batched capture at sites and positions, and per-head contrastive directions.

The package is named for what it holds rather than for its main verb, so the top-level function
`finesteer.capture` and a package never share a name.
"""

from __future__ import annotations

from finesteer.activations.capture import Activations, CaptureError, capture, to_tokens
from finesteer.activations.directions import (
    DirectionError,
    HeadDirections,
    LabelledCompletion,
    ab_contrast_inputs,
    capture_heads,
    directions_fingerprint,
    directions_from_activations,
    fit_head_directions,
)
from finesteer.activations.padding import PadSide, pad

__all__ = [
    "Activations",
    "CaptureError",
    "DirectionError",
    "HeadDirections",
    "LabelledCompletion",
    "PadSide",
    "ab_contrast_inputs",
    "capture",
    "capture_heads",
    "directions_fingerprint",
    "directions_from_activations",
    "fit_head_directions",
    "pad",
    "to_tokens",
]
