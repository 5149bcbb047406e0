"""The one error type the data package raises for bad data."""

from __future__ import annotations

from finesteer.errors import FinesteerError


class DatasetError(FinesteerError, ValueError):
    """A dataset file, row or name is unusable.

    A subclass of `ValueError` so callers that already catch bad-input errors keep working; the
    message always says which file (and, for a bad row, which 1-based line) and what is wrong, so a
    broken user file can be fixed without reading this package's code.
    """
