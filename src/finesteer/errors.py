"""The base of every error finesteer raises for bad input, bad data or a failed step."""

from __future__ import annotations


class FinesteerError(Exception):
    """Base for every user-facing error; the CLI prints these as one line.

    Each package keeps its own subclass (`SiteError`, `DatasetError`, ...) and its other base
    (`ValueError`, `RuntimeError`), so code that already catches those keeps working, while
    `except FinesteerError` catches every error finesteer raises on purpose.
    """
