"""Base class of every user-facing finesteer error; the CLI prints these as one line."""

from __future__ import annotations


class FinesteerError(Exception):
    """A problem with the user's input, data or environment (not a bug in finesteer)."""
