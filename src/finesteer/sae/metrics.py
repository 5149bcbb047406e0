"""SAE quality on a set of activations: reconstruction MSE, explained variance, L0, dead latents."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from finesteer.sae.model import SAEError, SparseAutoencoder


@dataclass(frozen=True)
class SAEMetrics:
    """mse: mean squared error per element; explained_variance: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the
    set's mean); l0: mean number of active latents per token; dead_share: fraction of latents that
    never fire on the set; n_tokens: how many activations were measured."""

    mse: float
    explained_variance: float
    l0: float
    dead_share: float
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, acts: Tensor, batch_size: int = 4096) -> SAEMetrics:
    """Measure `sae` on activations [N, d_in] (raw, as read at the SAE's site)."""
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise SAEError(f"need activations [N>0, d_in], got shape {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise SAEError("activations contain NaN or inf")
    acts = acts.double()
    mean = acts.mean(0)
    err = total = 0.0
    active = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), batch_size):
        x = acts[start : start + batch_size]
        recon, latents = sae(x.float())
        err += float(((x - recon.double()) ** 2).sum())
        total += float(((x - mean) ** 2).sum())
        nonzero = latents != 0
        active += int(nonzero.sum())
        fired |= nonzero.any(0)
    n = len(acts)
    return SAEMetrics(
        mse=err / (n * acts.shape[1]),
        explained_variance=1.0 - err / total if total > 0 else float("nan"),
        l0=active / n,
        dead_share=1.0 - float(fired.float().mean()),
        n_tokens=n,
    )


__all__ = ["SAEMetrics", "evaluate_sae"]
