"""Helpfulness checks: does an intervention cost the model its ordinary abilities?

Three numbers, each comparable with and without the intervention on the same model:

* multiple-choice accuracy by log-likelihood: each option's text is scored as the reply to the
  question (chat template, no choices shown), the highest total log-probability wins (and, as a
  length-robust variant, the highest mean per token);
* perplexity of harmless text (mean token negative log-likelihood, exponentiated);
* KL(p_base ‖ p_intervened) of the next-token distribution at the last prompt token of harmless
  prompts: how far the intervention moves the model where it should not matter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from finesteer.data.items import ABItem, option_lines
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.errors import EvaluationError
from finesteer.evaluate.stats import Estimate, mean_estimate, paired_effect, rate_estimate
from finesteer.interventions.edit import Intervention
from finesteer.models.context import check_prompt_lengths
from finesteer.models.loading import LoadedModel
from finesteer.scoring.forward import (
    applied,
    has_row_edits,
    log_probs_at,
    token_log_probs,
)

_CHOICES_HEADER = re.compile(r"\n\s*Choices:\s*$")


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice question: the stem without choices, the option texts and the correct index."""

    stem: str
    choices: tuple[str, ...]
    answer: int
    id: str
    letters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.stem.strip():
            raise EvaluationError(f"question {self.id!r} has an empty stem")
        if len(self.choices) < 2 or any(not c.strip() for c in self.choices):
            raise EvaluationError(f"question {self.id!r} needs ≥ 2 non-empty choices, got {self.choices}")
        if not 0 <= self.answer < len(self.choices):
            raise EvaluationError(f"question {self.id!r}: answer index {self.answer} is not a choice")


def mc_from_ab(item: ABItem) -> MCQuestion:
    """Split an A/B item ("stem\\n\\nChoices:\\n (A) x\\n (B) y") into stem, option texts and answer.

    The correct answer is the item's matching answer (as in `finesteer-mc`).
    """
    lines = option_lines(item.question)
    if len(lines) < 2:
        raise EvaluationError(f"item {item.id!r}: found {len(lines)} '(X) text' option lines, need ≥ 2")
    stem = _CHOICES_HEADER.sub("", item.question[: lines[0].start].rstrip()).strip()
    letters = tuple(line.letter for line in lines)
    if len(set(letters)) != len(letters):
        raise EvaluationError(f"item {item.id!r}: option letters repeat: {letters}")
    answer = letters.index(item.matching_letter)
    return MCQuestion(stem, tuple(line.text.strip(" \t") for line in lines), answer, item.id, letters)


@dataclass(frozen=True)
class MCResult:
    """Accuracy of the option with the highest summed log-probability (`accuracy`) and with the highest
    mean per-token log-probability (`accuracy_mean`); one record per question in `per_item`."""

    n: int
    accuracy: float
    count: int
    accuracy_mean: float
    count_mean: int
    per_item: list[dict[str, Any]]

    def estimate(self) -> Estimate:
        """The accuracy with its Wilson 95% interval and n."""
        return rate_estimate(self.count, self.n)


def _reject_row_edits(intervention: Intervention | None, what: str) -> None:
    if has_row_edits(intervention):
        raise EvaluationError(
            f"{what} takes a whole-batch intervention; per-row edits (Intervention.per_row) are for A/B scans"
        )


def mc_accuracy(
    lm: LoadedModel,
    questions: Sequence[MCQuestion | ABItem],
    *,
    system: str | None = None,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> MCResult:
    """Multiple-choice accuracy by log-likelihood of each option text as the chat reply to the stem.

    Prompt and option are tokenized separately and joined, so the scored span is exactly the option's
    tokens. Ties go to the earlier option.
    """
    qs = [mc_from_ab(q) if isinstance(q, ABItem) else q for q in questions]
    if not qs:
        raise EvaluationError("no multiple-choice questions to evaluate")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be ≥ 1, got {batch_size}")
    _reject_row_edits(intervention, "mc_accuracy")
    tokenizer = lm.tokenizer

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    pairs: list[tuple[int, list[int], int]] = []  # (question index, tokens, start of option)
    for qi, q in enumerate(qs):
        prompt_ids = encode(chat_prompt(tokenizer, q.stem, system))
        for choice in q.choices:
            option_ids = encode(choice)
            if not option_ids:
                raise EvaluationError(f"question {q.id!r}: option {choice!r} has no tokens")
            pairs.append((qi, prompt_ids + option_ids, len(prompt_ids)))
    check_prompt_lengths(lm, [len(tokens) for _, tokens, _ in pairs], what="question + option")
    sums: list[float] = []
    means: list[float] = []
    starts = range(0, len(pairs), batch_size)
    with applied(lm, intervention):
        for start in tqdm(starts, desc="MC log-likelihood", disable=not progress, unit="batch"):
            chunk = pairs[start : start + batch_size]
            for lp in token_log_probs(lm, [p[1] for p in chunk], [p[2] for p in chunk]):
                sums.append(float(lp.double().sum()))
                means.append(float(lp.double().mean()))
    per_item: list[dict[str, Any]] = []
    offset = 0
    for q in qs:
        k = len(q.choices)
        q_sums, q_means = sums[offset : offset + k], means[offset : offset + k]
        offset += k
        pick = max(range(k), key=lambda j: (q_sums[j], -j))
        pick_mean = max(range(k), key=lambda j: (q_means[j], -j))
        per_item.append(
            {
                "id": q.id,
                "answer": q.answer,
                "choice": pick,
                "correct": pick == q.answer,
                "choice_mean": pick_mean,
                "correct_mean": pick_mean == q.answer,
                "logprob_sum": q_sums,
                "logprob_mean": q_means,
            }
        )
    count = sum(r["correct"] for r in per_item)
    count_mean = sum(r["correct_mean"] for r in per_item)
    return MCResult(len(qs), count / len(qs), count, count_mean / len(qs), count_mean, per_item)


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean token NLL) over all scored tokens of all texts (token-weighted, as a corpus perplexity)."""

    perplexity: float
    mean_nll: float
    n_tokens: int
    n_texts: int
    n_skipped: int = 0


def perplexity(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    intervention: Intervention | None = None,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    max_tokens: int = 512,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of plain texts (BOS added by default, truncated to `max_tokens`).

    Texts of fewer than two tokens have nothing to predict; they are skipped and counted in
    `n_skipped` (an error if every text is skipped).
    """
    if not texts:
        raise EvaluationError("no texts to compute perplexity on")
    if max_tokens < 2:
        raise EvaluationError(f"max_tokens must be ≥ 2, got {max_tokens}")
    _reject_row_edits(intervention, "perplexity")
    encoded = [
        list(lm.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"])[:max_tokens] for t in texts
    ]
    kept = [seq for seq in encoded if len(seq) >= 2]
    if not kept:
        raise EvaluationError("every text is shorter than two tokens: nothing to score")
    total = 0.0
    n_tokens = 0
    with applied(lm, intervention):
        starts = range(0, len(kept), batch_size)
        for start in tqdm(starts, desc="perplexity", disable=not progress, unit="batch"):
            chunk = kept[start : start + batch_size]
            for lp in token_log_probs(lm, chunk, [1] * len(chunk)):
                total -= float(lp.double().sum())
                n_tokens += int(lp.numel())
    mean_nll = total / n_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, n_tokens, len(kept), len(texts) - len(kept))


@dataclass(frozen=True)
class KLResult:
    """KL(p_base ‖ p_intervened) in nats of the next-token distribution at each prompt's last token."""

    mean: float
    max: float
    n: int
    per_prompt: list[float]

    def estimate(self) -> Estimate:
        """The mean KL with its bootstrap 95% interval over prompts, and n."""
        return mean_estimate(self.per_prompt)


def next_token_kl(
    lm: LoadedModel,
    prompts: Sequence[str],
    intervention: Intervention | None,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> KLResult:
    """KL of the intervened model from the unmodified one on formatted prompts (chat template applied).

    Per batch: one forward without and one with the intervention, on the same right-padded tokens.
    Float error can make a KL a hair below 0; such values are reported as 0. With no intervention
    both passes are the plain model and every KL is exactly 0.
    """
    if not prompts:
        raise EvaluationError("no prompts to compute the KL on")
    _reject_row_edits(intervention, "next_token_kl")
    if intervention is not None:
        intervention.validate(lm.info)
    encoded = [list(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for i, seq in enumerate(encoded):
        if not seq:
            raise EvaluationError(f"prompt {i} has no tokens")
    check_prompt_lengths(lm, [len(seq) for seq in encoded])
    values: list[float] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="next-token KL", disable=not progress, unit="batch"):
        chunk = encoded[start : start + batch_size]
        last = [[len(seq) - 1] for seq in chunk]
        base = log_probs_at(lm, chunk, last)[:, 0].double()
        with applied(lm, intervention):
            steered = log_probs_at(lm, chunk, last)[:, 0].double()
        kl = (base.exp() * (base - steered)).sum(dim=-1)
        values += [max(0.0, float(v)) for v in kl]
    return KLResult(float(torch.tensor(values).mean()), max(values), len(values), values)


def evaluate_helpfulness(
    lm: LoadedModel,
    intervention: Intervention | None = None,
    *,
    mc_items: Sequence[MCQuestion | ABItem],
    texts: Sequence[str],
    kl_prompts: Sequence[str],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """MC accuracy and perplexity with and without `intervention`, and the KL between the two.

    Without an intervention only the base numbers are computed and the KL is reported as 0.
    """
    report: dict[str, Any] = {}
    base_mc = mc_accuracy(lm, mc_items, batch_size=batch_size, progress=progress)
    base_ppl = perplexity(lm, texts, batch_size=batch_size, progress=progress)
    report["base"] = {
        "mc_accuracy": base_mc.accuracy,
        "mc_accuracy_mean": base_mc.accuracy_mean,
        "mc_count": base_mc.count,
        "mc_interval": base_mc.estimate().to_dict(),
        "perplexity": base_ppl.perplexity,
        "mean_nll": base_ppl.mean_nll,
    }
    report["n_mc"] = base_mc.n
    report["n_texts"] = base_ppl.n_texts
    report["n_tokens"] = base_ppl.n_tokens
    report["n_kl_prompts"] = len(kl_prompts)
    per_item: dict[str, Any] = {"mc_base": base_mc.per_item}
    if intervention is None:
        report["intervened"] = None
        report["kl_mean"] = 0.0
        report["kl_max"] = 0.0
    else:
        mc = mc_accuracy(lm, mc_items, intervention=intervention, batch_size=batch_size, progress=progress)
        ppl = perplexity(lm, texts, intervention=intervention, batch_size=batch_size, progress=progress)
        kl = next_token_kl(lm, kl_prompts, intervention, batch_size=batch_size, progress=progress)
        report["intervened"] = {
            "mc_accuracy": mc.accuracy,
            "mc_accuracy_mean": mc.accuracy_mean,
            "mc_count": mc.count,
            "perplexity": ppl.perplexity,
            "mean_nll": ppl.mean_nll,
        }
        report["kl_mean"] = kl.mean
        report["kl_max"] = kl.max
        report["intervened"]["mc_interval"] = mc.estimate().to_dict()
        report["kl_interval"] = kl.estimate().to_dict()
        correct = [[float(r["correct"]) for r in result.per_item] for result in (mc, base_mc)]
        report["mc_vs_base"] = paired_effect(*correct, binary=True).to_dict()
        per_item["mc_intervened"] = mc.per_item
        per_item["kl"] = kl.per_prompt
    report["per_item"] = per_item
    return report
