"""The error of evaluations that cannot give a meaningful number."""

from __future__ import annotations


class EvaluationError(ValueError):
    """An evaluation that cannot give a meaningful number (no items or prompts, bad settings)."""
