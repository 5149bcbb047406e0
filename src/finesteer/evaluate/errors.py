"""The error of evaluations that cannot give a meaningful number."""

from __future__ import annotations

from finesteer.errors import FinesteerError


class EvaluationError(FinesteerError, ValueError):
    """An evaluation that cannot give a meaningful number (no items or prompts, bad settings)."""
