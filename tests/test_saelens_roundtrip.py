"""Round trip against the real `sae-lens` package (optional CI step, pinned in .ci/run).

SAEs built and saved by SAELens itself — standard, JumpReLU and TopK with and without
`rescale_acts_by_decoder_norm`, decoder rows unit-norm or not — load through `finesteer.load_sae`
(folder) and `from_saelens` (in memory) and give SAELens' own latents and reconstructions.
Skipped where sae-lens is not installed (the main test run); `.ci/run` installs it in a separate
environment and runs this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from finesteer.sae.io import from_saelens, load_sae  # noqa: E402

D_IN, D_SAE = 16, 48


def _randomised(sae: torch.nn.Module, seed: int, unit_norm: bool) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(sae.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=generator) * 0.2)
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.copy_(torch.log(torch.rand(sae.log_threshold.shape, generator=generator) * 0.2))
        if unit_norm:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    return sae.eval()


def _build(kind: str, rescale: bool, unit_norm: bool) -> torch.nn.Module:
    if kind == "topk":
        cfg = sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=rescale)
        sae = sae_lens.TopKSAE(cfg)
    elif kind == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    return _randomised(sae, seed=3, unit_norm=unit_norm)


CASES = [
    ("standard", False, False),
    ("jumprelu", False, False),
    ("topk", False, True),
    ("topk", True, True),
    ("topk", True, False),
]


@pytest.mark.parametrize(("kind", "rescale", "unit_norm"), CASES)
def test_saelens_saved_folder_loads_and_matches(
    tmp_path: Path, kind: str, rescale: bool, unit_norm: bool
) -> None:
    reference = _build(kind, rescale, unit_norm)
    reference.save_model(tmp_path / "sae")
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_latents = reference.encode(x)
        want_recon = reference.decode(want_latents)
    for ours in (load_sae(tmp_path / "sae"), from_saelens(reference)):
        with torch.no_grad():
            latents = ours.encode(x)
            recon = ours.decode(latents)
        assert torch.allclose(latents, want_latents, atol=1e-5), (kind, rescale, unit_norm)
        assert torch.allclose(recon, want_recon, atol=1e-5), (kind, rescale, unit_norm)
        assert ours.cfg.hook_name == "blocks.1.hook_resid_post"
        assert ours.cfg.site.layer == 1
