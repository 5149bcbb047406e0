"""Prompt → vector: what a system prompt does to the residual stream, as a steering vector.

For each user message, the chat prompt with the system prompt and the one without it (the model's
default) end in the same tokens: the user's text and the template tail up to the reply. Their
activations at those shared tokens differ only because of the system prompt, so the mean over
messages of (with − without), averaged over the shared tokens, is the prompt's CAA vector; passed
through the SAE with STA's atom selection it is the prompt's STA vector (norm-matched to the CAA
one). Steering with either can then be compared head to head with prompting itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finesteer.data.prompts import chat_prompt
from finesteer.fit.sta import (
    DEFAULT_TRIM,
    AtomStats,
    ContrastPair,
    SelectionMode,
    STAError,
    atom_statistics,
    fit_caa_from_stats,
    fit_from_stats,
)
from finesteer.fit.steering import Steering

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel
    from finesteer.sae.model import SparseAutoencoder


def system_prompt_pairs(
    tokenizer: Any, system_prompt: str, user_messages: Sequence[str], *, baseline_system: str | None = None
) -> list[ContrastPair]:
    """Pairs (with system prompt, without) whose completions are the identical shared tail.

    Each chat text is cut where the user's message starts: the prompts differ (system turn), the
    completions — user message + template tail — are the same text, so they tokenise identically.
    """
    if not system_prompt or not system_prompt.strip():
        raise STAError("the system prompt is empty")
    if not user_messages:
        raise STAError("no user messages to measure the system prompt on")
    pairs = []
    for i, user in enumerate(user_messages):
        if not user.strip():
            raise STAError(f"user message {i} is empty")
        with_text = chat_prompt(tokenizer, user, system_prompt)
        without_text = chat_prompt(tokenizer, user, baseline_system)
        cut_with, cut_without = with_text.rfind(user), without_text.rfind(user)
        if cut_with < 0 or cut_without < 0 or with_text[cut_with:] != without_text[cut_without:]:
            raise STAError("the chat template does not end both prompts with the same user turn")
        if with_text[:cut_with] == without_text[:cut_without]:
            raise STAError("the system prompt does not change the chat prompt (is it the default one?)")
        pairs.append(
            ContrastPair(
                (with_text[:cut_with], with_text[cut_with:]),
                (without_text[:cut_without], without_text[cut_without:]),
                str(i),
            )
        )
    return pairs


def prompt_vectors(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    system_prompt: str,
    user_messages: Sequence[str],
    *,
    trim: float = DEFAULT_TRIM,
    mode: SelectionMode = "sta",
    multiplier: float = 1.0,
    baseline_system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Steering]:
    """{"prompt_caa": raw residual difference, "prompt_sta": through the SAE} at the SAE's layer.

    Both are added at every position with `multiplier`; the STA vector has the CAA vector's norm.
    """
    stats = system_prompt_stats(
        lm, sae, system_prompt, user_messages, baseline_system=baseline_system, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    caa = fit_caa_from_stats(stats, sae, multiplier=multiplier)
    sta = fit_from_stats(stats, sae, mode=mode, trim=trim, multiplier=multiplier)
    extra = prompt_vector_metadata(system_prompt, stats)
    return {
        "prompt_caa": Steering("prompt_caa", caa.intervention, {**caa.metadata, **extra}),
        "prompt_sta": Steering("prompt_sta", sta.intervention, {**sta.metadata, **extra}),
    }


def system_prompt_stats(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    system_prompt: str,
    user_messages: Sequence[str],
    *,
    baseline_system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> AtomStats:
    """Atom statistics (and the CAA vector) of (with − without) the system prompt over the messages."""
    pairs = system_prompt_pairs(lm.tokenizer, system_prompt, user_messages, baseline_system=baseline_system)
    return atom_statistics(lm, sae, pairs, batch_size=batch_size, progress=progress)


def prompt_vector_metadata(system_prompt: str, stats: AtomStats) -> dict[str, Any]:
    """The provenance a prompt-derived vector adds to its fit's metadata."""
    return {"source": "system prompt", "system_prompt": system_prompt, "n_messages": stats.n_pairs}


__all__ = ["prompt_vector_metadata", "prompt_vectors", "system_prompt_pairs", "system_prompt_stats"]
