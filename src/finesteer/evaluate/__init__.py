"""Evaluation: verdicts, judges (keyword, OpenAI-compatible LLM, local model), scores (ASR, refusal
rates, A/B matching, Wilson intervals) and text metrics (fluency, repetition). Importing this
package does not import torch.

The names below are those of each submodule's ``__all__``; each submodule is the one place that lists
its public names.
"""

from __future__ import annotations

from finesteer.evaluate import judges, scores, text, verdict
from finesteer.evaluate.judges import *  # noqa: F403
from finesteer.evaluate.scores import *  # noqa: F403
from finesteer.evaluate.text import *  # noqa: F403
from finesteer.evaluate.verdict import *  # noqa: F403

__all__ = [*verdict.__all__, *judges.__all__, *scores.__all__, *text.__all__]
