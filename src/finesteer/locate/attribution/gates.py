"""Gated ablation: a gate a per prompt row, layer and head moves the head from the model (a = 0) to
its Ships ablation (a = 1), differentiably, so attribution estimates are derivatives along a.

`linearize="gate"` scales the head's query (`ua`) or output (`sc`) by 1 + a(ε − 1);
`linearize="activation"` (for `ua`) moves its output along z + a·Δz with Δz = (uniform-attention
output) − z, the exact ε → 0 change (see `finesteer.locate.attribution`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from finesteer.hooks import CallContext, HookSet
from finesteer.interventions.edit import check_eps
from finesteer.locate.attribution.metrics import AttributionError
from finesteer.locate.ships import DEFAULT_EPS, ablation_method
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

LINEARIZE: tuple[str, ...] = ("activation", "gate")
MAX_UNIFORM_EPS = 1e-3


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """Weights without gradients: backward then only computes what the gates need (about half)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _scale_hook(gates: Tensor, layer: int, head_dim: int, eps: float) -> Any:
    """act · (1 + a(ε − 1)) per head: a = 0 is the model, a = 1 the Ships `Scale(ε)` ablation."""

    def scale(act: Tensor, ctx: CallContext) -> Tensor:
        factor = 1 + gates[:, layer].repeat_interleave(head_dim, dim=-1) * (eps - 1)
        return act * factor[:, None, :].to(act.dtype)

    return scale


def _uniform_weights(mask: Any, batch: int, seq: int, device: torch.device) -> Tensor:
    """[b, 1|heads, S, S] attention weights of a head whose scores are all 0: softmax of the layer's
    mask alone (uniform over what each position may attend to: causal prefix, sliding window)."""
    if mask is None:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
        scores = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf)
    elif isinstance(mask, Tensor) and mask.dtype == torch.bool:
        scores = torch.zeros(mask.shape, device=device).masked_fill(~mask, -math.inf)
    elif isinstance(mask, Tensor) and mask.is_floating_point():
        scores = mask.float()
    else:
        raise AttributionError(
            f"unsupported attention mask {type(mask).__name__} for the uniform-attention estimate; "
            "use linearize='gate'"
        )
    if scores.dim() != 4 or scores.shape[-2] != seq or scores.shape[-1] != seq:
        raise AttributionError(f"attention mask of shape {tuple(scores.shape)} for {seq} tokens")
    return torch.softmax(scores, dim=-1)


def _uniform_hooks(lm: LoadedModel, gates: Tensor, layer: int, hooks: HookSet) -> None:
    """act + a·Δz at the head outputs, Δz = (uniform attention over the layer's own values) − z:
    the exact change of one head's output under `ua` with ε → 0, computed for all heads at once."""
    info = lm.info
    seen: dict[str, Any] = {}

    def keep_mask(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["mask"] = kwargs.get("attention_mask")  # every family passes it to attention by name

    def keep_values(act: Tensor, ctx: CallContext) -> None:
        seen["values"] = act.detach()

    def add_delta(act: Tensor, ctx: CallContext) -> Tensor:
        batch, seq = act.shape[0], act.shape[1]
        values = seen["values"].view(batch, seq, info.n_kv_heads, info.head_dim)
        values = values.repeat_interleave(info.n_heads // info.n_kv_heads, dim=2)
        weights = _uniform_weights(seen["mask"], batch, seq, act.device).to(values.dtype)
        uniform = torch.einsum("bhts,bshd->bthd", weights.expand(batch, info.n_heads, seq, seq), values)
        delta = uniform.reshape(batch, seq, info.z_dim) - act.detach()
        return act + gates[:, layer].repeat_interleave(info.head_dim, dim=-1)[:, None, :] * delta

    attention = lm.adapter.get(lm.adapter.block(lm.model, layer), lm.adapter.attention)
    hooks.keep(attention.register_forward_pre_hook(keep_mask, with_kwargs=True))
    hooks.add(Site(layer, "v"), keep_values)
    hooks.add(Site(layer, "z"), add_delta)


@contextmanager
def gated_ablation(
    lm: LoadedModel, gates: Tensor, mode: str, eps: float = DEFAULT_EPS, linearize: str = "activation"
) -> Iterator[None]:
    """Within the block, head (l, h) of batch row b is ablated to the degree gates[b, l, h]: 0 = the
    model, 1 = the Ships ablation (`linearize='activation'` with `ua`: its ε → 0 limit). Gradients
    flow to `gates`; this is the path along which the estimates are derivatives."""
    check_linearize(mode, check_eps(eps), linearize)
    if gates.dim() != 3 or tuple(gates.shape[1:]) != (lm.info.n_layers, lm.info.n_heads):
        raise AttributionError(
            f"gates must be [batch, {lm.info.n_layers}, {lm.info.n_heads}], got {tuple(gates.shape)}"
        )
    uniform = ablation_method(mode) == "uniform_attention"
    with HookSet(lm.model, lm.adapter) as hooks:
        for layer in range(lm.info.n_layers):
            if uniform and linearize == "activation":
                _uniform_hooks(lm, gates, layer, hooks)
            else:
                site = Site(layer, "q" if uniform else "z")
                hooks.add(site, _scale_hook(gates, layer, lm.info.head_dim, eps))
        yield


def check_linearize(mode: str, eps: float, linearize: str) -> None:
    if linearize not in LINEARIZE:
        raise AttributionError(f"unknown linearize '{linearize}'; choose {' or '.join(LINEARIZE)}")
    if ablation_method(mode) == "uniform_attention" and linearize == "activation" and eps > MAX_UNIFORM_EPS:
        raise AttributionError(
            f"the activation estimate of 'ua' takes the ε → 0 limit (uniform attention); ε = {eps:g} is "
            f"not small (> {MAX_UNIFORM_EPS:g}): use linearize='gate'"
        )
