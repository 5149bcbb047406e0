"""What a user (and every stage after loading) needs to know about a model's shape."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """Architecture numbers that per-head code must use (never derive head_dim from hidden/heads)."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # Derived extras for site widths (mlp.hook_post, router logits); not part of the recorded shape
    # (`to_dict`), so artifacts and run folders written before they existed still match.
    d_mlp: int | None = field(default=None, compare=False)
    n_experts: int | None = field(default=None, compare=False)

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def z_dim(self) -> int:
        """Width of the o_proj input: all heads' outputs concatenated (≠ hidden_size for Gemma)."""
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    @classmethod
    def from_config(cls, config: Any, family: str) -> ModelInfo:
        """Read the numbers from a HF text config; `head_dim` from the config when it is given."""
        n_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if d_mlp is None and getattr(config, "model_type", None) == "gpt2":
            d_mlp = 4 * int(config.hidden_size)  # GPT-2's n_inner=None means 4 × hidden
        return cls(
            family=family,
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            d_mlp=None if n_experts or d_mlp is None else int(d_mlp),
            n_experts=int(n_experts) if n_experts else None,
        )
