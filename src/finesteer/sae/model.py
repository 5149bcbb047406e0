"""A sparse autoencoder (ReLU / TopK / JumpReLU) on one residual-stream site, SAELens-compatible.

Parameters and maths follow SAELens 6 exactly so weights can be exchanged both ways:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold [d_sae] for
JumpReLU);

    pre = (s·x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc
    f   = relu(pre)                          (standard, a.k.a. ReLU)
        = relu(topk_k(pre)), others 0        (topk: the k largest pre-activations, then ReLU)
        = relu(pre)·1[pre > threshold]       (jumprelu)
    x̂   = (f @ W_dec + b_dec) / s

where s is the norm scaling factor ("expected_average_only_in": the factor that makes the mean
activation norm √d_in during training) or 1. Training uses s for a scale-free learning rate; saving
folds it into the weights (as SAELens does), so a saved SAE reads raw activations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from finesteer.errors import FinesteerError
from finesteer.sites import Site, SiteError

ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu")
"""SAELens architecture names; "relu" is accepted as an alias of "standard"."""

_ALIASES = MappingProxyType(
    {"relu": "standard", "standard": "standard", "topk": "topk", "jumprelu": "jumprelu"}
)

NORMALISATIONS: tuple[str, ...] = ("none", "expected_average_only_in")
"""Input normalisations we implement (SAELens names); others SAELens knows are refused on load."""

DTYPES = MappingProxyType(
    {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
)


class SAEError(FinesteerError, ValueError):
    """An SAE that is malformed or does not fit its input (bad config, shapes, NaN weights)."""


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it reads: sizes, architecture, the site, the input normalisation.

    `hook_name` is a TransformerLens hook name (`blocks.12.hook_resid_post`), the key SAELens and
    Neuronpedia use; `metadata` carries anything else worth keeping in `cfg.json` (context size,
    dataset, training metrics) and is written under SAELens' `metadata` object.
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    hook_name: str = ""
    model_name: str = ""
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = _ALIASES.get(str(self.architecture).lower())
        if arch is None:
            raise SAEError(
                f"unknown SAE architecture {self.architecture!r}; choose relu (standard), topk or jumprelu"
            )
        object.__setattr__(self, "architecture", arch)
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in and d_sae must be ≥ 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if arch == "topk":
            if self.k is None or not 1 <= int(self.k) <= self.d_sae:
                raise SAEError(f"a topk SAE needs 1 ≤ k ≤ d_sae={self.d_sae}, got k={self.k}")
            object.__setattr__(self, "k", int(self.k))
        if self.normalize_activations not in NORMALISATIONS:
            raise SAEError(
                f"normalize_activations {self.normalize_activations!r} is not supported; "
                f"finesteer implements {', '.join(NORMALISATIONS)}"
            )
        if self.normalize_activations == "expected_average_only_in":
            factor = self.norm_scaling_factor
            if factor is None or not math.isfinite(float(factor)) or float(factor) <= 0:
                raise SAEError(
                    "normalize_activations='expected_average_only_in' needs a positive finite "
                    f"norm_scaling_factor, got {factor!r}"
                )
        if self.dtype not in DTYPES:
            raise SAEError(f"dtype {self.dtype!r} unknown; choose {', '.join(DTYPES)}")
        if self.hook_name:
            try:
                Site.parse(self.hook_name)
            except SiteError as exc:
                raise SAEError(
                    f"hook_name {self.hook_name!r} is not a TransformerLens site name: {exc}"
                ) from exc
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def site(self) -> Site:
        """The finesteer site the SAE reads (from `hook_name`)."""
        if not self.hook_name:
            raise SAEError("this SAE has no hook_name, so the site it reads is unknown")
        return Site.parse(self.hook_name)

    @property
    def scale(self) -> float:
        """Factor s applied to inputs before encoding (1 without normalisation)."""
        if self.normalize_activations == "expected_average_only_in":
            return float(self.norm_scaling_factor)  # type: ignore[arg-type]
        return 1.0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class SAEOutput(NamedTuple):
    """A forward pass: the reconstruction x̂ (input space) and the latent activations f."""

    reconstruction: Tensor
    latents: Tensor


class SparseAutoencoder(nn.Module):
    """SAE module; `encode`, `decode` and `forward` work on any leading batch shape [..., d_in]."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))

    # --- construction -----------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, generator: torch.Generator | None = None) -> SparseAutoencoder:
        """Training init: unit-norm random decoder rows, encoder = decoder transpose, zero biases.

        The tied transpose init (OpenAI TopK / SAELens) starts every latent as a matched filter of
        its own direction, which keeps early dead latents rare.
        """
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec.dtype))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.architecture == "jumprelu":
            self.threshold.fill_(1e-3)
        return self

    @classmethod
    def from_state(cls, cfg: SAEConfig, state: Mapping[str, Tensor]) -> SparseAutoencoder:
        """Build from a state dict, checking every key and shape (a clear error, not a silent mismatch)."""
        sae = cls(cfg)
        expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise SAEError(
                f"SAE weights do not match a {cfg.architecture} SAE: missing {missing}, unexpected {extra}"
            )
        for name, shape in expected.items():
            got = tuple(state[name].shape)
            if got != shape:
                raise SAEError(
                    f"SAE weight {name} has shape {got}; "
                    f"cfg (d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}"
                )
            if not torch.isfinite(state[name]).all():
                raise SAEError(f"SAE weight {name} contains NaN or inf")
        with torch.no_grad():
            for name, param in sae.named_parameters():
                param.copy_(state[name].to(param.dtype))
        return sae

    # --- maths ------------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEError(f"SAE input has width {x.shape[-1]}; this SAE reads d_in={self.cfg.d_in}")

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations (before ReLU / TopK / threshold)."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype) * self.cfg.scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Latent activations from pre-activations, per the architecture."""
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.encode_pre(x))

    def decode(self, latents: Tensor) -> Tensor:
        if latents.shape[-1] != self.cfg.d_sae:
            raise SAEError(f"latents have width {latents.shape[-1]}; this SAE has d_sae={self.cfg.d_sae}")
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.scale

    def forward(self, x: Tensor) -> SAEOutput:
        latents = self.encode(x)
        return SAEOutput(self.decode(latents), latents)

    # --- transforms -------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each decoder row to unit norm, so a latent's activation is its contribution's norm.

        TopK training does this after every step without touching the encoder (the OpenAI recipe):
        the optimiser adapts, and compensating the encoder would change which k latents win.
        """
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        self.W_dec.div_(norms[:, None])

    @torch.no_grad()
    def folded(self) -> SparseAutoencoder:
        """An equivalent SAE with the norm scaling factor folded into the weights (reads raw inputs).

        With s: W_enc·s, W_dec/s, b_dec/s; encode and decode are unchanged (SAELens'
        `fold_activation_norm_scaling_factor`).
        """
        s = self.cfg.scale
        metadata = {**self.cfg.metadata, **({"folded_norm_scaling_factor": s} if s != 1.0 else {})}
        cfg = replace(self.cfg, normalize_activations="none", norm_scaling_factor=None, metadata=metadata)
        out = SparseAutoencoder(cfg)
        state = {name: p.detach().clone() for name, p in self.named_parameters()}
        state["W_enc"] = state["W_enc"] * s
        state["W_dec"] = state["W_dec"] / s
        state["b_dec"] = state["b_dec"] / s
        with torch.no_grad():
            for name, param in out.named_parameters():
                param.copy_(state[name])
        return out

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.architecture == "topk" else ""
        cfg = self.cfg
        return f"{cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}, hook={cfg.hook_name!r}"


__all__ = ["ARCHITECTURES", "NORMALISATIONS", "SAEConfig", "SAEError", "SAEOutput", "SparseAutoencoder"]
