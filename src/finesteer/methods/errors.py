"""The methods stage's error type, in its own module so data loading and the interface share it."""

from __future__ import annotations

from finesteer.errors import FinesteerError


class MethodError(FinesteerError, ValueError):
    """An unknown method, a setting it does not take, or data it cannot fit on."""


__all__ = ["MethodError"]
