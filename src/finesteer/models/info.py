"""What a user (and every stage after loading) needs to know about a model's shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def z_dim(self) -> int:
        """Width of the o_proj input: all heads' outputs concatenated (≠ hidden_size for Gemma)."""
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any, family: str) -> ModelInfo:
        """Read the numbers from a HF text config; `head_dim` from the config when it is given."""
        n_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            family=family,
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
        )
