"""Which judge scores a comparison's open-ended replies: a rubric per behaviour, an LLM endpoint or a
local model (expected score over the rubric's label tokens where the scale allows)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

from finesteer.data.prompts import chat_prompt
from finesteer.errors import FinesteerError
from finesteer.evaluate.judges import (
    CAA_BEHAVIOUR_0_10,
    HSI_COORDINATION_0_5,
    JudgeConfigError,
    LLMJudge,
    LocalModelJudge,
    Rubric,
    resolve_endpoint,
)
from finesteer.evaluate.kl import token_ids
from finesteer.evaluate.verdict import Judge
from finesteer.generation import GenerationConfig, generate
from finesteer.models.loading import load_model
from finesteer.scoring.forward import log_probs_at

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

JudgeKind = Literal["auto", "llm", "local", "none"]
JUDGE_KINDS: tuple[str, ...] = ("auto", "llm", "local", "none")
DEFAULT_LOCAL_JUDGE = "qwen2.5-coder-0.5b-instruct"
COORDINATION_BEHAVIOURS: tuple[str, ...] = ("coordinate-other-ais", "hsi-coordination")


class JudgeChoiceError(FinesteerError, ValueError):
    """No rubric for the behaviour, or an unknown judge kind."""


def behaviour_rubric(behaviour: str) -> Rubric:
    """HSI's 0–5 coordination rubric for AI coordination, CAA's 0–10 rubric for the other behaviours."""
    if behaviour in COORDINATION_BEHAVIOURS:
        return HSI_COORDINATION_0_5
    rubric = CAA_BEHAVIOUR_0_10.get(behaviour)
    if rubric is None:
        known = ", ".join([*COORDINATION_BEHAVIOURS, *CAA_BEHAVIOUR_0_10])
        raise JudgeChoiceError(f"no open-ended judge rubric for behaviour '{behaviour}' (known: {known})")
    return rubric


def local_judge_generate(
    judge_lm: LoadedModel, *, max_new_tokens: int = 8, batch_size: int = 8
) -> Callable[[list[tuple[str, str]]], list[str]]:
    """A `LocalModelJudge` transport: chat-format each (system, user) pair and decode greedily."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def complete(messages: list[tuple[str, str]]) -> list[str]:
        prompts = [chat_prompt(judge_lm.tokenizer, user, system=system) for system, user in messages]
        return generate(judge_lm, prompts, config)

    return complete


def local_judge_expected_score(
    judge_lm: LoadedModel, rubric: Rubric, *, batch_size: int = 8, min_mass: float = 0.5
) -> Callable[[list[tuple[str, str]]], list[str]] | None:
    """A `LocalModelJudge` transport that answers with the judge's *expected* score.

    For an integer scale whose labels are single tokens (HSI's 0–5), the next-token probabilities
    of the labels after the chat prompt give E[score] = Σ v·p(v) (renormalised over the labels),
    returned as text for the rubric to parse. A small judge's greedy answer is nearly constant
    (Qwen2.5-0.5B says "4" to almost anything); the expectation keeps its ordering. When the labels
    carry less than `min_mass` of the probability the reply is left unparsable (no score).
    None when the scale does not fit (non-integer bounds, multi-token labels such as "10").
    """
    low, high = rubric.low, rubric.high
    if rubric.kind != "scale" or low != int(low) or high != int(high):
        return None
    values = list(range(int(low), int(high) + 1))
    tokenizer = judge_lm.tokenizer
    ids = [tokenizer(str(v), add_special_tokens=False)["input_ids"] for v in values]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        return None
    label_ids = [i[0] for i in ids]

    def complete(messages: list[tuple[str, str]]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(messages), batch_size):
            chunk = messages[start : start + batch_size]
            texts = [chat_prompt(tokenizer, user, system=system) for system, user in chunk]
            seqs = [token_ids(judge_lm, text) for text in texts]
            logp = log_probs_at(judge_lm, seqs, [[len(s) - 1] for s in seqs])[:, 0].double()
            probs = logp[:, label_ids].exp()
            for row in probs:
                mass = float(row.sum())
                if mass < min_mass:
                    replies.append(f"no score: the labels hold only {mass:.2f} of the probability")
                    continue
                expected = sum(v * float(p) for v, p in zip(values, row / mass, strict=True))
                replies.append(f"{expected:.4f}")
        return replies

    return complete


def make_judge(
    behaviour: str,
    kind: JudgeKind = "auto",
    *,
    local_model: str = DEFAULT_LOCAL_JUDGE,
    env: Mapping[str, str] | None = None,
) -> tuple[Judge | None, str]:
    """The open-ended judge and a description of it for the results.

    auto: an OpenAI-compatible endpoint when `FINESTEER_JUDGE_BASE_URL` (or `OPENAI_BASE_URL`) and
    `FINESTEER_JUDGE_MODEL` are set, else the local model. llm: the endpoint, or an error naming
    what is missing. local: `local_model` (a registry name) on the same rubric, scored by its
    expected label (`local_judge_expected_score`) where the scale allows, else greedily; a 0.5B
    judge is far weaker than the GPT-4-class judges of the papers. none: no judge.
    """
    if kind not in JUDGE_KINDS:
        raise JudgeChoiceError(f"unknown judge '{kind}'; choose one of {', '.join(JUDGE_KINDS)}")
    if kind == "none":
        return None, "none"
    rubric = behaviour_rubric(behaviour)
    env = os.environ if env is None else env
    if kind in ("auto", "llm"):
        try:
            endpoint = resolve_endpoint(env=env)
        except JudgeConfigError:
            if kind == "llm":
                raise
        else:
            # HSI's judge protocol: 5 samples at T=1, averaged; CAA's: one reply at T=0.
            samples = 5 if rubric is HSI_COORDINATION_0_5 else 1
            judge = LLMJudge(rubric, env=env, n_samples=samples)
            return judge, f"llm:{endpoint.model} ({rubric.name}, n={samples})"

    judge_lm = load_model(local_model)
    expected = local_judge_expected_score(judge_lm, rubric)
    if expected is not None:
        judge = LocalModelJudge(expected, rubric, max_parse_retries=0)
        return judge, f"local:{local_model} ({rubric.name}, expected score over label tokens)"
    judge = LocalModelJudge(local_judge_generate(judge_lm), rubric, max_parse_retries=0)
    return judge, f"local:{local_model} ({rubric.name}, greedy)"


__all__ = [
    "COORDINATION_BEHAVIOURS",
    "DEFAULT_LOCAL_JUDGE",
    "JUDGE_KINDS",
    "JudgeChoiceError",
    "JudgeKind",
    "behaviour_rubric",
    "local_judge_expected_score",
    "local_judge_generate",
    "make_judge",
]
