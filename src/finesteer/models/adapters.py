"""Where the heads live in each supported architecture family.

One small adapter per family names the submodules finesteer hooks; everything else (shapes, GQA,
head_dim) comes from the config. The model code itself is never forked or edited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from finesteer.errors import FinesteerError


class UnsupportedArchitectureError(FinesteerError, ValueError):
    """The model's architecture has no adapter, or lacks a module the adapter expects."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Dotted paths (relative to the causal-LM module) of the parts finesteer hooks.

    `query_module` is the last module whose output is the per-head query before RoPE: `q_proj` in
    most families, `q_norm` where a per-head RMSNorm follows it (Gemma 3), because scaling before
    that norm would be undone by it. `query_heads_first` says that module's output is laid out
    [batch, heads, seq, head_dim] (Gemma 3 transposes before q_norm; Qwen 3 after).
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
    query_heads_first: bool = False
    mlp: str = "mlp"

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

    def validate(self, model: nn.Module, n_layers: int) -> None:
        """Check every module we will hook exists, so a mismatch fails at load, not mid-run."""
        layers = self.layer_list(model)
        if len(layers) != n_layers:
            raise UnsupportedArchitectureError(
                f"config says {n_layers} layers but '{self.layers}' holds {len(layers)} modules"
            )
        self.get(model, self.base_model)
        self.get(model, self.final_norm)
        for name in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.query_module):
            self.attn_part(model, 0, name)
        self.get(self.block(model, 0), self.mlp)


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "granite")

ADAPTERS: Mapping[str, ArchitectureAdapter] = MappingProxyType(
    {
        **{family: ArchitectureAdapter(family=family) for family in _LLAMA_LIKE},
        "qwen3": ArchitectureAdapter(family="qwen3", query_module="q_norm"),
        "gemma3_text": ArchitectureAdapter(
            family="gemma3_text", query_module="q_norm", query_heads_first=True
        ),
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
