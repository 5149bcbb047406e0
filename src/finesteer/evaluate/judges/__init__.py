"""Judges: turn a (prompt, response) pair into a :class:`~finesteer.evaluate.verdict.Verdict`.

Three families, one interface (:class:`~finesteer.evaluate.verdict.Judge`):

* :class:`KeywordRefusalJudge` (:mod:`.keyword`) -- the string-matching refusal detectors of GCG /
  AdvBench and of Ships/Sahara (Zhou et al., ICLR 2025), with their short/repetitive-output filters.
* :class:`LLMJudge` (:mod:`.llm_http`) -- a rubric scored by any OpenAI-compatible chat-completions
  endpoint.
* :class:`LocalModelJudge` (:mod:`.local`) -- the same rubric scored by a local generation callable.

Rubrics and their parser are in :mod:`.rubric`, the prompt texts in :mod:`.prompts`.

Score convention for *safety* judges (keyword judges and the :data:`HARMFULNESS` rubric):
``Verdict.score == 1.0`` means the attack succeeded (the response is harmful / complied) and
``0.0`` that it did not, so that the mean score is the attack success rate. For scale rubrics
(:data:`HSI_COORDINATION_0_5`, :data:`CAA_BEHAVIOUR_0_10`) the score is the rubric value (mean over
samples). A score that could not be obtained is ``None`` with the reason, never a silent 0.
"""

from __future__ import annotations

from finesteer.evaluate.judges.keyword import (
    GCG_REFUSAL_PREFIXES,
    SHIPS_REFUSAL_KEYWORDS,
    KeywordRefusalJudge,
)
from finesteer.evaluate.judges.llm_http import (
    EndpointConfig,
    JudgeConfigError,
    JudgeRequestError,
    LLMJudge,
    resolve_endpoint,
)
from finesteer.evaluate.judges.local import LocalModelJudge
from finesteer.evaluate.judges.prompts import (
    CAA_BEHAVIOUR_0_10,
    CAA_SCORING_PROMPTS,
    CAA_SYSTEM_PROMPT,
    HARMFULNESS,
    HSI_COORDINATE_PROMPT_0_5,
    HSI_COORDINATION_0_5,
    HSI_SYSTEM_PROMPT,
    scale_rubric,
)
from finesteer.evaluate.judges.rubric import ChatMessages, Rubric

__all__ = [
    "CAA_BEHAVIOUR_0_10",
    "CAA_SCORING_PROMPTS",
    "CAA_SYSTEM_PROMPT",
    "GCG_REFUSAL_PREFIXES",
    "HARMFULNESS",
    "HSI_COORDINATE_PROMPT_0_5",
    "HSI_COORDINATION_0_5",
    "HSI_SYSTEM_PROMPT",
    "SHIPS_REFUSAL_KEYWORDS",
    "ChatMessages",
    "EndpointConfig",
    "JudgeConfigError",
    "JudgeRequestError",
    "KeywordRefusalJudge",
    "LLMJudge",
    "LocalModelJudge",
    "Rubric",
    "resolve_endpoint",
    "scale_rubric",
]
