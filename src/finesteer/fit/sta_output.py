"""Output-side atom scores: select STA's atoms by what their decoder directions *do* to the output.

STA picks atoms by how differently they fire on wanted and unwanted answers (input side). Arad et
al. (2025) find SAE steering 2–3× better when features are picked by their effect on the output
instead. Here the output effect of atom j is the first-order change of a refusal metric when its
decoder direction d_j = W_dec[j] / scale is added at the SAE's site at every position (how STA
steers):

    s_j = d_j · g,   g = mean over prompts of  ∂/∂δ  log Σ_{t ∈ refusal openings} p(t | prompt, h + δ)

at δ = 0, the first response token after the chat-formatted prompt (`refusal_metric_gradient`:
one forward and one backward per batch, for every atom at once). Given a refusal direction r
instead, s_j = d_j · r̂ (`direction_atom_scores`). An atom's contribution to the STA vector's
effect is c_j = Δa_j · s_j; `select_output` keeps the STA-selected atoms whose contribution is
positive (they push towards refusal), the top `keep` fraction of them by c_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from finesteer.activations.padding import pad
from finesteer.data.prompts import chat_prompt
from finesteer.fit.sta import DEFAULT_TRIM, STAError, select_atoms
from finesteer.hooks import CallContext, HookSet
from finesteer.locate.attribution.metrics import TokenLogProb, refusal_token_ids
from finesteer.sae.model import SparseAutoencoder

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

DEFAULT_KEEP = 0.5
"""Fraction of the positively contributing STA atoms kept by `select_output`."""


def refusal_metric_gradient(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    questions: Sequence[str],
    *,
    token_ids: Sequence[int] | None = None,
    system: str | None = None,
    batch_size: int = 8,
) -> Tensor:
    """g [d_in]: the mean over `questions` of the gradient of the first-token refusal log-probability
    with respect to a vector added at the SAE's site at every real position."""
    if not questions:
        raise STAError("output-side atom scores need at least one prompt")
    site = sae.cfg.site
    site.validate(lm.info)
    metric = TokenLogProb(token_ids if token_ids is not None else refusal_token_ids(lm.tokenizer))
    encoded = [
        list(lm.tokenizer(chat_prompt(lm.tokenizer, q, system), add_special_tokens=False)["input_ids"])
        for q in questions
    ]
    delta = torch.zeros(sae.cfg.d_in, dtype=torch.float32, device=lm.device, requires_grad=True)

    def add(act: Tensor, ctx: CallContext) -> Tensor:
        return act + ctx.real[..., None].to(act.dtype) * delta.to(act.dtype)

    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with HookSet(lm.model, lm.adapter) as hooks:
        hooks.add(site, add)
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask = pad(chunk, "right", pad_id)
            out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            last = torch.tensor([len(s) - 1 for s in chunk], device=lm.device)
            logits = out.logits[torch.arange(len(chunk), device=lm.device), last]
            values = metric.values(logits, torch.arange(len(chunk)))
            (grad,) = torch.autograd.grad(values.sum(), delta)
            total += grad.detach().double().cpu()
    if not torch.isfinite(total).all():
        raise STAError("non-finite refusal-metric gradient")
    return (total / len(encoded)).float()


def decoder_directions(sae: SparseAutoencoder) -> Tensor:
    """d_j = W_dec[j] / scale [d_sae, d_in]: what atom j adds in the model's activation space."""
    with torch.no_grad():
        return (sae.W_dec / sae.cfg.scale).float().cpu()


def output_atom_scores(sae: SparseAutoencoder, gradient: Tensor) -> Tensor:
    """s_j = d_j · g [d_sae]: first-order change of the refusal metric per unit of atom j."""
    if gradient.shape != (sae.cfg.d_in,):
        raise STAError(f"gradient must have shape ({sae.cfg.d_in},), got {tuple(gradient.shape)}")
    return decoder_directions(sae) @ gradient.float().cpu()


def direction_atom_scores(sae: SparseAutoencoder, direction: Tensor) -> Tensor:
    """s_j = d_j · r̂ [d_sae]: each atom's push along a refusal direction (e.g. difference of means)."""
    r = direction.float().flatten().cpu()
    if r.shape != (sae.cfg.d_in,) or not float(r.norm()) > 0:
        raise STAError(f"the refusal direction must be a non-zero vector of width {sae.cfg.d_in}")
    return decoder_directions(sae) @ (r / r.norm())


def select_output(
    delta_a: Tensor,
    delta_f: Tensor,
    scores: Tensor,
    *,
    trim: float = DEFAULT_TRIM,
    keep: float = DEFAULT_KEEP,
) -> Tensor:
    """Mask [d_sae]: STA's atoms (amplitude and frequency at `trim`) whose contribution c_j = Δa_j·s_j
    is positive, then the top `keep` fraction of those by c_j (ties kept)."""
    if scores.shape != delta_a.shape:
        raise STAError(f"scores {tuple(scores.shape)} and Δa {tuple(delta_a.shape)} must match")
    if not 0 < keep <= 1:
        raise STAError(f"keep must be in (0, 1], got {keep}")
    if not torch.isfinite(scores).all():
        raise STAError("output scores contain NaN or inf")
    contribution = delta_a.double() * scores.double()
    candidates = select_atoms(delta_a, delta_f, trim, "sta") & (contribution > 0)
    n = int(candidates.sum())
    if n == 0:
        raise STAError("no STA atom pushes towards the output: check the prompts or the sign of the data")
    count = max(1, int(keep * n))
    threshold = contribution[candidates].sort(descending=True).values[count - 1]
    return candidates & (contribution >= threshold)


def output_selection_metadata(delta_a: Tensor, scores: Tensor, mask: Tensor, n: int = 20) -> dict[str, Any]:
    """Provenance: the kept atoms with the largest contribution, and the share of the total."""
    contribution = delta_a.double() * scores.double()
    kept = mask.nonzero().flatten()
    order = kept[contribution[kept].argsort(descending=True)][:n]
    positive = float(contribution.clamp(min=0).sum())
    return {
        "output_top_atoms": [
            {"atom": int(i), "delta_a": float(delta_a[i]), "output_score": float(scores[i])} for i in order
        ],
        "output_contribution_kept": float(contribution[kept].sum()),
        "output_contribution_positive_total": positive,
    }


__all__ = [
    "DEFAULT_KEEP",
    "decoder_directions",
    "direction_atom_scores",
    "output_atom_scores",
    "output_selection_metadata",
    "refusal_metric_gradient",
    "select_output",
]
