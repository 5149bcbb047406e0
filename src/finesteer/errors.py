"""The base of every error finesteer raises for bad input, bad data or a failed step."""

from __future__ import annotations


class FinesteerError(Exception):
    """Base for every user-facing error; the CLI prints these as one line.

    Each package keeps its own subclass (`SiteError`, `DatasetError`, ...) and its other base
    (`ValueError`, `RuntimeError`), so code that already catches those keeps working, while
    `except FinesteerError` catches every error finesteer raises on purpose.
    """


class ArgumentError(FinesteerError, ValueError):
    """An argument outside its range (a count < 1, a NaN or negative number)."""


def check_count(value: object, name: str, *, minimum: int = 1) -> int:
    """`value` as an int ≥ `minimum` (batch sizes, token counts, group sizes), else ArgumentError
    naming the option: nothing is silently clamped."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def check_number(value: object, name: str, *, minimum: float | None = None) -> float:
    """`value` as a finite float (≥ `minimum` when given), else ArgumentError naming the option."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ArgumentError(f"{name} must be ≥ {minimum}, got {value!r}")
    return number
