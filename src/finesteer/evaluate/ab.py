"""A/B behaviour metrics: how often a model picks the behaviour-matching answer of a multiple-choice item.

Two ways to read the answer, as the seed methods did:

* letter probability (CAA): the reply is pre-filled with "(" and the next-token probabilities of
  the option letters are compared, p(matching) / Σ p(options). One forward per batch, no sampling
  noise, and it works even when the model would not answer in the expected format.
* generated answer (HSI): the model writes a free reply and "(A)" / "(B)" is parsed out of it, so
  the metric sees what a user would see, including replies that answer neither.

Items may have more than two options (CAA survival-instinct); every function uses the letters
listed in the question (`ABItem.options`), never a fixed ("A", "B").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from finesteer.data.balance import SWAP_SUFFIX, matching_polarity, unswapped_id
from finesteer.data.items import ABItem
from finesteer.evaluate.scores import matching_rate, wilson_interval
from finesteer.evaluate.stats import DEFAULT_CONFIDENCE, Estimate, mean_estimate, rate_estimate
from finesteer.generation import GenerationConfig, generate
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import (
    DEFAULT_PROMPT,
    UNDEFINED,
    ABPrompt,
    ABScorer,
    PromptStyle,
    ab_generation_prompt,
    check_items,
    parse_ab_answer,
)
from finesteer.scoring.forward import check_rows, rows_for_batch

log = logging.getLogger(__name__)


def mirror_clusters(records: Sequence[dict[str, Any]]) -> list[str] | None:
    """One cluster label per record, shared by an item and its option-swapped mirror; None when no
    record is a mirror (every item is then independent)."""
    ids = [str(record.get("id", "")) for record in records]
    return [unswapped_id(i) for i in ids] if any(i.endswith(SWAP_SUFFIX) for i in ids) else None


@dataclass(frozen=True)
class ABResult:
    """A/B matching rate of one evaluation.

    `matching_rate` = `count` / `n`: the share of items whose answer is the matching one (letter
    probability: the most probable option; generated: the parsed answer, undefined counted as not
    matching, as HSI did). `mean_p_matching` is the CAA number (mean normalised probability; None for
    generated answers). `n_undefined` counts generated replies with no or several option letters.
    `per_item` holds one JSON-ready record per item.
    """

    n: int
    matching_rate: float
    count: int
    mean_p_matching: float | None
    per_item: list[dict[str, Any]]
    n_undefined: int = 0
    method: str = "prob"

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval of the matching rate."""
        return wilson_interval(self.count, self.n, confidence)

    def estimates(self, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Estimate | None]:
        """The matching rate (Wilson interval) and mean p(matching) (bootstrap over items, seed 0,
        an item and its mirror resampled together; None for generated answers) as `Estimate`s."""
        out: dict[str, Estimate | None] = {
            "matching_rate": rate_estimate(self.count, self.n, confidence),
            "mean_p_matching": None,
        }
        if self.mean_p_matching is not None:
            p = [record["p_matching"] for record in self.per_item if "p_matching" in record]
            out["mean_p_matching"] = (
                mean_estimate(p, confidence, clusters=mirror_clusters(self.per_item))
                if len(p) == self.n
                else Estimate(self.mean_p_matching, self.n, math.nan, math.nan, confidence,
                              "bootstrap-percentile", "per-item p(matching) not kept")
            )  # fmt: skip
        return out

    def by_matching_polarity(self) -> dict[str, dict[str, float]]:
        """Matching rate split by whether the matching option says "Yes", "No" or other (see
        `finesteer.data.balance.matching_polarity`): an edit that only adds a "Yes" bias helps the
        first group and hurts the second."""
        groups: dict[str, list[bool]] = {}
        for record in self.per_item:
            if "matching_polarity" in record:
                groups.setdefault(record["matching_polarity"], []).append(bool(record["is_matching"]))
        return {
            name: {"n": len(values), "matching_rate": sum(values) / len(values)}
            for name, values in sorted(groups.items())
        }

    def to_dict(self, *, per_item: bool = True) -> dict[str, Any]:
        low, high = self.interval()
        out: dict[str, Any] = {
            "method": self.method,
            "n": self.n,
            "matching_rate": self.matching_rate,
            "count": self.count,
            "ci95": [low, high],
            "mean_p_matching": self.mean_p_matching,
            "n_undefined": self.n_undefined,
            "by_matching_polarity": self.by_matching_polarity(),
            "interval": {
                name: None if estimate is None else estimate.to_dict()
                for name, estimate in self.estimates().items()
            },
        }
        if per_item:
            out["per_item"] = self.per_item
        return out


# --------------------------------------------------------------------------------------------------
# Letter probabilities
# --------------------------------------------------------------------------------------------------


def ab_matching_rate_prob(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    prompt: ABPrompt = DEFAULT_PROMPT,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> ABResult:
    """Matching rate by letter probability: share of items whose most probable option is the matching one,
    plus the CAA mean of p(matching) / Σ p(options). Scored by `ABScorer`'s full-forward path; a
    per-row intervention (`Intervention.per_row`) gives item i the i-th intervention."""
    items = check_items(items)
    scores = ABScorer(lm, items, prompt, batch_size=batch_size).score([intervention], progress=progress)
    choices, option_probs = scores.choices(0), scores.option_prob_dicts(0)
    per_item = [
        {
            "id": item.id,
            "matching": item.matching_letter,
            "matching_polarity": matching_polarity(item),
            "choice": choices[i],
            "is_matching": bool(scores.matching[0, i]),
            "p_matching": float(scores.p_matching[0, i]),
            "option_probs": option_probs[i],
            "option_mass": float(scores.option_mass[0, i]),
            "token_mode": scores.targets[i].mode,
        }
        for i, item in enumerate(items)
    ]
    count = int(scores.matching[0].sum())
    return ABResult(
        n=len(items),
        matching_rate=count / len(items),
        count=count,
        mean_p_matching=float(scores.p_matching[0].mean()),
        per_item=per_item,
        n_undefined=0,
        method="prob",
    )


# --------------------------------------------------------------------------------------------------
# Generated answers
# --------------------------------------------------------------------------------------------------


def ab_matching_rate_generated(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    system: str | None = None,
    intervention: Intervention | None = None,
    config: GenerationConfig | None = None,
    prompt_style: PromptStyle = "hsi",
    progress: bool = False,
) -> ABResult:
    """Matching rate of generated answers parsed with `parse_ab_answer` (undefined = not matching).

    Greedy, 64 new tokens by default (`config`); with sampling, batch b is seeded `config.seed + `
    index of its first item, as `finesteer.generation` does. A per-row intervention gives item i
    the i-th intervention whatever the batch size.
    """
    items = check_items(items)
    config = config or GenerationConfig(max_new_tokens=64)
    check_rows(intervention, len(items))
    if intervention is not None:
        intervention.validate(lm.info)
    prompts = [
        ab_generation_prompt(lm.tokenizer, item, system=system, prompt_style=prompt_style) for item in items
    ]
    responses: list[str] = []
    starts = range(0, len(items), config.batch_size)
    for start in tqdm(starts, desc="A/B generations", disable=not progress, unit="batch"):
        indices = list(range(start, min(start + config.batch_size, len(items))))
        batch_config = replace(
            config,
            batch_size=len(indices),
            seed=None if config.seed is None else config.seed + start,
        )
        responses += generate(
            lm,
            [prompts[i][0] for i in indices],
            batch_config,
            intervention=rows_for_batch(intervention, indices),
        )
    parsed = [
        parse_ab_answer(prefix + response, item.options)
        for (_, prefix), response, item in zip(prompts, responses, items, strict=True)
    ]
    rate = matching_rate(
        [None if p == UNDEFINED else p for p in parsed],
        [item.matching_letter for item in items],
        undefined="wrong",
    )
    per_item = [
        {
            "id": item.id,
            "matching": item.matching_letter,
            "matching_polarity": matching_polarity(item),
            "choice": answer,
            "is_matching": answer == item.matching_letter,
            "response": response,
        }
        for item, answer, response in zip(items, parsed, responses, strict=True)
    ]
    return ABResult(
        n=rate.n,
        matching_rate=rate.rate if rate.n else math.nan,
        count=rate.count,
        mean_p_matching=None,
        per_item=per_item,
        n_undefined=rate.n_missing,
        method=f"generate:{prompt_style}",
    )


def generation_check(
    lm: LoadedModel,
    items: Sequence[ABItem],
    intervention: Intervention,
    max_new_tokens: int,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Generated-answer matching rate and undefined count on `items`, unmodified vs steered."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows: dict[str, Any] = {"n": len(items), "max_new_tokens": max_new_tokens}
    for name, edit in (("unmodified", None), ("steered", intervention)):
        result = ab_matching_rate_generated(
            lm, items, system=prompt.system, intervention=edit, config=config, progress=progress
        )
        rows[name] = {"matching_rate": result.matching_rate, "n_undefined": result.n_undefined}
    lost = rows["steered"]["n_undefined"] - rows["unmodified"]["n_undefined"]
    if lost > 0.25 * len(items):
        log.warning(
            "HSI final check: with the chosen edit %d more of %d validation replies name no option "
            "(%d vs %d); the edit breaks the answer format, consider a smaller α",
            lost,
            len(items),
            rows["steered"]["n_undefined"],
            rows["unmodified"]["n_undefined"],
        )
    return rows
