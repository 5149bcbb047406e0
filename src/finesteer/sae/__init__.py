"""Sparse autoencoders: a SAELens-compatible SAE module, its on-disk format, and training one on a
model's residual stream when no pretrained SAE is reachable (finesteer works offline).

    from finesteer.sae import load_sae
    sae = load_sae("~/.cache/finesteer/saes/smollm2-135m-instruct/blocks.12.hook_resid_post/topk-4608-k64")
    latents = sae.encode(resid)            # [..., d_sae]

`load_sae(folder)` reads any SAELens folder (cfg.json + sae_weights.safetensors); with the `sae_lens`
package and hub access, `load_sae(release, sae_id)` defers to SAELens' pretrained registry.
"""

from __future__ import annotations

from finesteer.sae.io import load_sae, save_sae
from finesteer.sae.metrics import SAEMetrics, evaluate_sae
from finesteer.sae.model import ARCHITECTURES, SAEConfig, SAEError, SAEOutput, SparseAutoencoder

__all__ = [
    "ARCHITECTURES",
    "SAEConfig",
    "SAEError",
    "SAEMetrics",
    "SAEOutput",
    "SparseAutoencoder",
    "evaluate_sae",
    "load_sae",
    "save_sae",
]
