"""The cheap refusal proxy: first-token refusal log-odds under an intervention, and harmless KL.

Generating replies and judging them is the real measure of refusal; the first-token proxy reads only
the next-token distribution at the end of the prompt: p = Σ p(t) over the first tokens of typical
refusal openings ("I", "Sorry", "As", …, `attribution.metrics.refusal_token_ids`), reported as the
log-odds log p − log(1 − p) (Arditi et al. 2024's "refusal score"; > 0: the model more likely starts
with a refusal). Its cost on harmless prompts is KL(p_base ‖ p_edited) of the same distribution.
Both run through the simple scan, one hooked forward per (candidate, batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from finesteer.interventions.edit import Intervention
from finesteer.locate.attribution.metrics import MetricReadout, TokenLogProb, refusal_token_ids
from finesteer.locate.engine import EncodedPrompts, as_encoded
from finesteer.locate.scan import KLFromBase, LastLogits, scan
from finesteer.models.loading import LoadedModel


def refusal_metric(lm: LoadedModel) -> TokenLogProb:
    """log p(the reply starts like a refusal), from the model's own tokenisation of the openings."""
    return TokenLogProb(refusal_token_ids(lm.tokenizer))


def log_odds(log_prob: Tensor) -> Tensor:
    """log p − log(1 − p) from log p, stable near p = 1 (float64)."""
    log_prob = log_prob.double().clamp(max=-1e-12)
    return log_prob - torch.log(-torch.expm1(log_prob))


def refusal_scores(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    candidates: Sequence[Intervention],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "refusal proxy",
) -> Tensor:
    """[n_candidates, n_prompts] first-token refusal log-odds under each candidate intervention."""
    readout = MetricReadout(refusal_metric(lm))
    values = scan(
        lm, as_encoded(lm, prompts), candidates, readout, batch_size=batch_size, progress=progress, desc=desc
    )
    return log_odds(values)


def first_token_refusal(
    lm: LoadedModel, prompts: Sequence[str], intervention: Intervention | None = None, *, batch_size: int = 8
) -> list[float]:
    """p(the reply starts like a refusal) per formatted prompt, under `intervention` (None: unedited)."""
    odds = refusal_scores(lm, list(prompts), [intervention or Intervention()], batch_size=batch_size)[0]
    return torch.sigmoid(odds).tolist()


def base_last_logits(
    lm: LoadedModel, prompts: EncodedPrompts | Sequence[str], *, batch_size: int = 8
) -> Tensor:
    """The unedited model's last-position logits [P, vocab], the reference of `harmless_kl`."""
    encoded = as_encoded(lm, prompts)
    return scan(lm, encoded, [Intervention()], LastLogits(), batch_size=batch_size, progress=False)[0]


def harmless_kl(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    candidates: Sequence[Intervention],
    base_logits: Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "harmless KL",
) -> Tensor:
    """[n_candidates, n_prompts] KL(p_base ‖ p_candidate) of the next token (nats)."""
    return scan(
        lm,
        as_encoded(lm, prompts),
        candidates,
        KLFromBase(base_logits),
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )


__all__ = [
    "base_last_logits",
    "first_token_refusal",
    "harmless_kl",
    "log_odds",
    "refusal_metric",
    "refusal_scores",
]
