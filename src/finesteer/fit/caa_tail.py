"""Where CAA steering starts: the tokens the chat template writes after the user's text.

CAA steers every position from the end of the instruction: the last K prompt tokens (the template's
closing/opening markers and the pre-filled "(" the letter-probability metric scores), then every
generated token. K is measured on a probe message with the tokenizer's character offsets.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from finesteer.data.prompts import chat_prompt
from finesteer.errors import FinesteerError
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, letter_target

PROBE_USER_TEXT = "Which option do you choose?"
"""User text used to measure the chat template's tail (any text whose end is a word boundary works)."""


class CAAError(FinesteerError, ValueError):
    """CAA inputs that cannot give a vector (no items, letters that are not single tokens, NaN)."""


def template_tail_ids(tokenizer: Any, prompt: ABPrompt = DEFAULT_PROMPT) -> list[int]:
    """Token ids the chat template writes after the user's text, followed by `prefill`'s tokens.

    Measured on a probe message with the tokenizer's character offsets: a token belongs to the tail
    when it ends after the user text does (a token straddling the seam counts as tail, so steering
    never starts too late).
    """
    text = chat_prompt(tokenizer, PROBE_USER_TEXT, prompt.system, prompt.prefill)
    end = text.rfind(PROBE_USER_TEXT)
    if end < 0:
        raise CAAError("the chat template does not reproduce the user's text; cannot locate its end")
    end += len(PROBE_USER_TEXT)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        # Slow tokenizers have no offsets: count the tokens added by the tail instead.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
        return list(ids[len(head) :])
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    first = next((i for i, (_, stop) in enumerate(offsets) if stop > end), len(ids))
    return ids[first:]


def scored_prefill(tokenizer: Any, prompt: ABPrompt = DEFAULT_PROMPT) -> str:
    """The part of `prefill` that is in the token sequence the letter-probability metric scores.

    `finesteer.scoring.ab.letter_target` reads "A" after a "(" token where the tokenizer keeps them
    apart (SmolLM2), but stops before the "(" and scores the merged "(A" token where the tokenizer
    merges them (Qwen2.5). Steering must start at the same place relative to the end of that sequence.
    """
    probe = chat_prompt(tokenizer, PROBE_USER_TEXT, prompt.system, prompt.prefill)
    target = letter_target(tokenizer, probe, ("A", "B"), prefill=prompt.prefill, item_id="template probe")
    return prompt.prefill[:-1] if target.mode == "merged_paren" else prompt.prefill


def instruction_tail_tokens(tokenizer: Any, prompt: ABPrompt = DEFAULT_PROMPT) -> int:
    """K for the `from_end:K` scope: tokens after the user's text, the scored pre-fill included.

    SmolLM2 (ChatML, "(" a token of its own): 7 = `<|im_end|>` "\n" `<|im_start|>` "ass" "istant"
    "\n" "("; Qwen2.5 (merges "(A", so the metric's sequence ends before "("): 5.
    """
    return len(scored_tail_ids(tokenizer, prompt))


def scored_tail_ids(tokenizer: Any, prompt: ABPrompt = DEFAULT_PROMPT) -> list[int]:
    """The template tail as the letter-probability metric's token sequence ends: the tail tokens
    followed by the scored part of the pre-fill (see `scored_prefill`)."""
    return template_tail_ids(tokenizer, replace(prompt, prefill=scored_prefill(tokenizer, prompt)))


def caa_scope(k: int) -> str:
    """The scope string CAA interventions use: the last K prompt tokens and every generated token."""
    if k < 1:
        raise CAAError(f"K must be ≥ 1, got {k}")
    return f"from_end:{k}"


__all__ = [
    "PROBE_USER_TEXT",
    "CAAError",
    "caa_scope",
    "instruction_tail_tokens",
    "scored_prefill",
    "scored_tail_ids",
    "template_tail_ids",
]
