"""Where the heads live in each supported architecture family.

One small adapter per family names the submodules finesteer hooks; everything else (shapes, GQA,
head_dim) comes from the config. The model code itself is never forked or edited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn

from finesteer.errors import FinesteerError


class UnsupportedArchitectureError(FinesteerError, ValueError):
    """The model's architecture has no adapter, or lacks a module the adapter expects."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Dotted paths (relative to the causal-LM module, or to one block) of the parts finesteer hooks.

    `query_module` / `key_module` is the last module whose output is the per-head query / key before
    RoPE: `q_proj` / `k_proj` in most families, `q_norm` / `k_norm` where a norm follows (Gemma 3,
    Qwen 3, OLMo 2), because scaling before that norm would be undone by it (OLMo 2's norm even spans
    all heads). `query_heads_first` says those norm outputs are laid out [batch, heads, seq, head_dim]
    (Gemma 3 transposes before its norms; Qwen 3 after).

    `fused_qkv`: one projection (`q_proj` = `k_proj` = `v_proj`, e.g. GPT-2 `c_attn`, Phi-3
    `qkv_proj`) whose output is [q | k | v]; the q/k/v sites are its column slices. `conv1d`: weights
    are stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]; use `weight()`.

    `attn_input` is the block submodule whose input is the residual stream entering attention (after
    every block pre-hook); `attn_branch` the one whose output is added, unscaled, to the residual
    after attention (the attention itself, or its post-norm in Gemma 2/3 and OLMo 2). Together they
    give `hook_resid_mid` = input + branch; None where the family scales the branch (Granite).
    `mlp_down` (relative to the MLP) takes the MLP's hidden activation (`mlp.hook_post`) as input;
    None for mixture-of-experts blocks. `router` (relative to the MLP) returns the expert router
    logits first; None for dense families.
    """

    family: str
    base_model: str = "model"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    query_module: str = "q_proj"
    key_module: str = "k_proj"
    query_heads_first: bool = False
    fused_qkv: bool = False
    conv1d: bool = False
    attn_input: str = "input_layernorm"
    attn_branch: str | None = "self_attn"
    mlp: str = "mlp"
    mlp_down: str | None = "down_proj"
    router: str | None = None

    def get(self, model: nn.Module, path: str) -> nn.Module:
        """Resolve a dotted path, failing with the family and the missing piece named."""
        module: nn.Module = model
        for part in path.split("."):
            child = getattr(module, part, None)
            if child is None:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__}: expected submodule '{path}' for family '{self.family}', "
                    f"but '{part}' is missing"
                )
            module = child
        return module

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        layers = self.get(model, self.layers)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"'{self.layers}' is not a ModuleList in {type(model).__name__}"
            )
        return layers

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layer_list(model)[layer]

    def attn_part(self, model: nn.Module, layer: int, name: str) -> nn.Module:
        """A submodule of layer `layer`'s attention, e.g. `o_proj`."""
        return self.get(self.block(model, layer), f"{self.attention}.{name}")

    def mlp_part(self, model: nn.Module, layer: int, name: str | None, what: str) -> nn.Module:
        """A submodule of layer `layer`'s MLP (`mlp_down`, `router`); `what` names the site for errors."""
        if name is None:
            raise UnsupportedArchitectureError(f"family '{self.family}' has no {what}")
        return self.get(self.block(model, layer), f"{self.mlp}.{name}")

    def weight(self, module: nn.Module) -> Tensor:
        """`module.weight` as [out, in] (a transposed view for Conv1D), so in-place edits reach the model."""
        weight = module.weight
        if not isinstance(weight, Tensor):
            raise UnsupportedArchitectureError(f"{type(module).__name__} has no weight tensor")
        return weight.T if self.conv1d else weight

    def validate(self, model: nn.Module, n_layers: int) -> None:
        """Check every module we will hook exists, so a mismatch fails at load, not mid-run."""
        layers = self.layer_list(model)
        if len(layers) != n_layers:
            raise UnsupportedArchitectureError(
                f"config says {n_layers} layers but '{self.layers}' holds {len(layers)} modules"
            )
        self.get(model, self.base_model)
        self.get(model, self.final_norm)
        for name in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.query_module, self.key_module):
            self.attn_part(model, 0, name)
        block = self.block(model, 0)
        for name in (self.mlp, self.attn_input, self.attn_branch):
            if name is not None:
                self.get(block, name)


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")
_NORMED_QK = {"query_module": "q_norm", "key_module": "k_norm"}
_POST_NORM = {"attn_branch": "post_attention_layernorm"}

ADAPTERS: Mapping[str, ArchitectureAdapter] = MappingProxyType(
    {
        **{family: ArchitectureAdapter(family=family) for family in _LLAMA_LIKE},
        "granite": ArchitectureAdapter(family="granite", attn_branch=None),  # residual_multiplier
        "qwen3": ArchitectureAdapter(family="qwen3", **_NORMED_QK),
        "gemma2": ArchitectureAdapter(family="gemma2", **_POST_NORM),
        "gemma3_text": ArchitectureAdapter(
            family="gemma3_text", query_heads_first=True, **_NORMED_QK, **_POST_NORM
        ),
        "olmo2": ArchitectureAdapter(family="olmo2", attn_input="self_attn", **_NORMED_QK, **_POST_NORM),
        "phi3": ArchitectureAdapter(
            family="phi3",
            fused_qkv=True,
            **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "qkv_proj"),
            query_module="qkv_proj",
            key_module="qkv_proj",
        ),
        "gpt2": ArchitectureAdapter(
            family="gpt2",
            base_model="transformer",
            layers="transformer.h",
            final_norm="transformer.ln_f",
            attention="attn",
            **dict.fromkeys(("q_proj", "k_proj", "v_proj"), "c_attn"),
            o_proj="c_proj",
            query_module="c_attn",
            key_module="c_attn",
            fused_qkv=True,
            conv1d=True,
            attn_input="ln_1",
            attn_branch="attn",
            mlp_down="c_proj",
        ),
        "qwen2_moe": ArchitectureAdapter(family="qwen2_moe", mlp_down=None, router="gate"),
        "mixtral": ArchitectureAdapter(family="mixtral", mlp_down=None, router="gate"),
    }
)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """Pick the adapter from `config.model_type`; unknown families get an error listing supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; is it a HF model?"
        )
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}' ({type(model).__name__}): finesteer knows "
            f"{', '.join(sorted(ADAPTERS))}. Adding one means naming where its q/k/v/o projections, "
            "blocks, MLP and final norm live (finesteer.models.adapters.ArchitectureAdapter)."
        )
    return adapter
