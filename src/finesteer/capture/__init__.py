"""Reading activations: batched capture at sites and positions, and per-head contrastive directions.

`finesteer.capture` is also callable as the capture function itself, so both
`fs.capture(lm, prompts, sites)` and `from finesteer.capture import HeadDirections` work.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from finesteer.capture.activations import Activations, CaptureError, capture
from finesteer.capture.directions import (
    DirectionError,
    HeadDirections,
    LabelledCompletion,
    ab_contrast_inputs,
    capture_heads,
    directions_fingerprint,
    directions_from_activations,
    fit_head_directions,
)
from finesteer.capture.padding import PadSide, pad

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
]


class _CallablePackage(types.ModuleType):
    """The package object answers `finesteer.capture(...)` with `capture.activations.capture(...)`.

    Needed because `finesteer.capture` is both this package and, since before the package existed,
    the top-level capture function; once the package is imported Python binds the name to it.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
