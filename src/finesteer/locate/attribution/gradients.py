"""The gate pass: one forward with every head gated, then gate-only backward passes that give, per
prompt, layer and head, ∂m/∂a (first-order metrics) or the Fisher Σ_o p_o (∂ log p_o/∂a)² (KL)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.interventions.edit import check_eps
from finesteer.locate.attribution.gates import check_linearize, frozen_weights, gated_ablation
from finesteer.locate.attribution.metrics import AttributionError, KLDivergence, Metric
from finesteer.locate.engine import EncodedPrompts, as_encoded, last_logits, prompt_batches
from finesteer.locate.ships import DEFAULT_EPS
from finesteer.models.loading import LoadedModel


def _fisher(logits: Tensor, gates: Tensor, outcomes: int) -> Tensor:
    """Σ_o p_o (∂ log p_o / ∂a)² per row, layer and head over the top tokens + 'the rest'."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    vocab = log_probs.shape[-1]
    k = min(outcomes, vocab)
    top = log_probs.detach().topk(k, dim=-1).indices
    parts = [log_probs.gather(1, top)]
    if k < vocab:
        rest = log_probs.scatter(1, top, -math.inf)
        parts.append(torch.logsumexp(rest, dim=-1, keepdim=True))
    outcome_log_probs = torch.cat(parts, dim=1)  # [B, O]
    weights = outcome_log_probs.detach().exp()
    fisher = torch.zeros_like(gates, dtype=torch.float64)
    for o in range(outcome_log_probs.shape[1]):
        (grad,) = torch.autograd.grad(outcome_log_probs[:, o].sum(), gates, retain_graph=True)
        fisher += weights[:, o, None, None] * grad.double() ** 2
    return fisher


def gate_gradients(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    linearize: str = "activation",
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """Per prompt, layer and head [P, L, H]: ∂m/∂a (first-order metrics) or the Fisher Σ_o p_o
    (∂ log p_o/∂a)² (KL), with a the head's gate from the model (0) to its ablation (1)."""
    encoded = as_encoded(lm, prompts)
    return gate_pass(lm, encoded, metric, mode, check_eps(eps), linearize, batch_size, progress)[0]


def gate_pass(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    metric: Metric,
    mode: str,
    eps: float,
    linearize: str,
    batch_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Gate derivatives [P, L, H] and the model's own last-position logits [P, vocab] (all gates at 0
    add exact zeros / multiply by exactly 1, so these are the unablated logits)."""
    check_linearize(mode, eps, linearize)
    info = lm.info
    out = torch.empty((len(encoded), info.n_layers, info.n_heads), dtype=torch.float64)
    base: Tensor | None = None
    batches = prompt_batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
    with frozen_weights(lm.model):
        for batch in tqdm(batches, desc=f"attribution {mode}", unit="batch", disable=not progress):
            size = int(batch.input_ids.shape[0])
            gates = torch.zeros((size, info.n_layers, info.n_heads), device=lm.device, requires_grad=True)
            with gated_ablation(lm, gates, mode, eps, linearize), torch.enable_grad():
                logits = last_logits(lm, batch)
                if metric.order == 2:
                    assert isinstance(metric, KLDivergence)
                    values = _fisher(logits, gates, metric.outcomes)
                else:
                    m = metric.values(logits, batch.rows)
                    if not m.requires_grad:
                        raise AttributionError(f"metric {metric.key()} does not depend on the logits")
                    (values,) = torch.autograd.grad(m.sum(), gates)
            if not bool(torch.isfinite(values).all()):
                raise AttributionError(f"attribution gave NaN/inf for prompts {batch.rows.tolist()}")
            out[batch.rows] = values.detach().double().cpu()
            if base is None:
                base = torch.empty((len(encoded), logits.shape[-1]))
            base[batch.rows] = logits.detach().float().cpu()
    assert base is not None
    return out, base
