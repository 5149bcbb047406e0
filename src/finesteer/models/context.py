"""Prompt lengths a model can take: no empty prompt, nothing longer than its context window.

An empty prompt has no position to read or steer, and a prompt longer than the context window is
silently mis-scored by position embeddings the model never learned, so both are refused before any
forward, naming the prompt and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finesteer.errors import FinesteerError


class PromptLengthError(FinesteerError, ValueError):
    """A prompt with no tokens, or with more tokens than the model's context window."""


def context_length(model: Any) -> int | None:
    """The model's context window (`max_position_embeddings` of its text config), None if unknown."""
    config = getattr(getattr(model, "model", model), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_prompt_lengths(model: Any, lengths: Sequence[int], *, extra: int = 0, what: str = "prompt") -> None:
    """Refuse an empty prompt, or one whose `lengths[i] + extra` tokens (extra: tokens to generate)
    exceed the context window of `model` (a LoadedModel or HF model)."""
    limit = context_length(model)
    for i, n in enumerate(lengths):
        if n <= 0:
            raise PromptLengthError(f"{what} {i} is empty (no tokens); every {what} needs text")
        if limit is not None and n + extra > limit:
            plus = f" + {extra} new tokens" if extra else ""
            raise PromptLengthError(
                f"{what} {i} has {n} tokens{plus}, more than the model's context of {limit}; "
                "shorten it (finesteer does not truncate silently)"
            )


__all__ = ["PromptLengthError", "check_prompt_lengths", "context_length"]
