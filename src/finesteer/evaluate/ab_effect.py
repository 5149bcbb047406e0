"""A/B behaviour rates of a model, with or without an intervention (`eval ab`, `fit … --test`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finesteer.data.items import ABItem
from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
from finesteer.evaluate.ab_paired import ab_effect_vs
from finesteer.evaluate.answer_bias import answer_bias
from finesteer.generation import GenerationConfig
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt


def ab_effect(
    lm: LoadedModel,
    items: Sequence[ABItem],
    intervention: Intervention | None,
    *,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Matching rate (letter probability) of `items` unmodified vs steered, and the difference
    (`effect`: paired intervals and tests, anti-steerable fraction; see `ab_effect_vs`), and whether
    a polarity group moves the wrong way (`answer_bias`)."""
    base = ab_matching_rate_prob(lm, items, prompt=prompt, batch_size=batch_size)
    steered = ab_matching_rate_prob(
        lm, items, prompt=prompt, intervention=intervention, batch_size=batch_size
    )
    comparison = ab_effect_vs(base, steered)
    return {
        "n": base.n,
        "baseline": base.to_dict(per_item=False),
        "steered": steered.to_dict(per_item=False),
        "delta_matching_rate": steered.matching_rate - base.matching_rate,
        "effect": comparison.to_dict(),
        "answer_bias": answer_bias(comparison),
    }


AB_METHODS: tuple[str, ...] = ("prob", "generate", "both")


def ab_rates(
    lm: LoadedModel,
    items: Sequence[ABItem],
    intervention: Intervention | None = None,
    *,
    method: str = "both",
    system: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    prompt_style: str = "hsi",
    progress: bool = True,
) -> dict[str, Any]:
    """A/B behaviour rate by letter probability (`method` prob), parsed generated answers (generate) or both.

    Keys: matching_rate_prob, mean_p_matching, matching_rate_generated, n_undefined (None for a
    method not run), plus the full `prob` and `generated` results of the methods run.
    """
    result: dict[str, Any] = {
        "matching_rate_prob": None,
        "mean_p_matching": None,
        "matching_rate_generated": None,
        "n_undefined": None,
    }
    if method in ("prob", "both"):
        prob = ab_matching_rate_prob(
            lm,
            items,
            prompt=ABPrompt(system),
            intervention=intervention,
            batch_size=batch_size,
            progress=progress,
        )
        result.update(matching_rate_prob=prob.matching_rate, mean_p_matching=prob.mean_p_matching)
        result["prob"] = prob.to_dict()
    if method in ("generate", "both"):
        config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
        gen = ab_matching_rate_generated(
            lm,
            items,
            system=system,
            intervention=intervention,
            config=config,
            prompt_style=prompt_style,  # type: ignore[arg-type]
            progress=progress,
        )
        result.update(matching_rate_generated=gen.matching_rate, n_undefined=gen.n_undefined)
        result["generated"] = gen.to_dict()
    return result
