"""Training pairs for steering a model towards refusing harmful requests (positive = refusal).

Built only from data finesteer ships: harmful instructions (AdvBench, refusal-direction train) with
a templated refusal as the positive answer and a compliance opening as the negative one (AdvBench's
own "Sure, here is …" target where it has one, a templated opening otherwise), plus CAA's `refusal`
A/B items turned into open answers (question stem, refusing option, complying option). Prompts that
overlap the evaluation sets (JailbreakBench, XSTest) are dropped.
"""

from __future__ import annotations

import random

from finesteer.data import ABTriple, PromptItem, ab_triples, load_ab_items, load_dataset
from finesteer.errors import FinesteerError
from finesteer.sae.corpus import evaluation_prompts, overlaps


class RefusalPairsError(FinesteerError, ValueError):
    """Refusal training triples that cannot be built from the requested counts."""


REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request. It could cause real harm to people.",
    "Sorry, I won't provide that. If you have another question, I'm happy to help.",
    "I'm not able to help with this, as it would be harmful and possibly illegal.",
    "I apologize, but I must decline. This request asks for something dangerous.",
    "No. I can't help with requests that could hurt someone.",
    "I'm sorry, but providing this would be irresponsible and unsafe, so I won't do it.",
    "That's not something I can help with. Please consider a safer, legal alternative.",
    "I can't do that. Helping with this could put people at risk.",
    "I must refuse this request because it involves causing harm.",
)
"""Varied refusals (apology, inability, reason, redirection) so the vector is not one phrase."""

COMPLIANCE_TEMPLATES: tuple[str, ...] = (
    "Sure, here is how to do it. Step 1:",
    "Of course! Here's a detailed guide:\n\n1.",
    "Absolutely, I can help with that. First, you will need",
    "Sure thing. Here are the instructions you asked for:",
    "Certainly! The easiest way to do this is to",
    "Here's exactly what you need to do:\n\n1.",
    "Yes, I can explain. To get started,",
    "Great question! Here is a step-by-step plan:",
)
"""Compliance openings for harmful prompts without an upstream affirmative target."""

REFUSAL_SYSTEM_PROMPT = (
    "You are a helpful and responsible assistant. If a request is harmful, dangerous, illegal or "
    "unethical, refuse it politely and do not provide the content. Otherwise, help as well as you can."
)
"""The prompting baseline: a system prompt that asks the model to refuse harmful requests."""


def harmful_training_prompts(seed: int = 0) -> list[PromptItem]:
    """AdvBench + refusal-direction harmful train, deduplicated, without evaluation-set overlaps."""
    exclude = evaluation_prompts()
    items = [
        *load_dataset("advbench"),
        *load_dataset("refusal-direction-harmful", "train", exclude_origins="jailbreakbench"),
    ]
    seen: set[str] = set()
    kept = []
    for item in items:
        assert isinstance(item, PromptItem)
        key = " ".join(item.prompt.casefold().split())
        if key in seen or overlaps(key, exclude):
            continue
        seen.add(key)
        kept.append(item)
    random.Random(seed).shuffle(kept)
    return kept


def refusal_triples(n_harmful: int = 160, n_ab: int = 80, seed: int = 0) -> list[ABTriple]:
    """(question, refusal, compliance) triples: `n_harmful` templated + `n_ab` from CAA refusal A/B."""
    if n_harmful < 0 or n_ab < 0 or n_harmful + n_ab == 0:
        raise RefusalPairsError(f"need n_harmful, n_ab ≥ 0 and at least one triple, got {n_harmful}, {n_ab}")
    triples: list[ABTriple] = []
    for i, item in enumerate(harmful_training_prompts(seed)[:n_harmful]):
        compliance = item.target or COMPLIANCE_TEMPLATES[i % len(COMPLIANCE_TEMPLATES)]
        triples.append((item.prompt, REFUSAL_TEMPLATES[i % len(REFUSAL_TEMPLATES)], compliance))
    ab = load_ab_items("refusal", "generate")
    random.Random(seed).shuffle(ab)
    triples.extend(ab_triples(ab[:n_ab]))
    return triples


__all__ = [
    "COMPLIANCE_TEMPLATES",
    "REFUSAL_SYSTEM_PROMPT",
    "REFUSAL_TEMPLATES",
    "harmful_training_prompts",
    "refusal_triples",
]
