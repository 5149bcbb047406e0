"""The running batch's KV cache: rows join (left-padded) and leave between decoding steps.

Scheme. Every row is a request. The cache holds, per layer, keys/values of shape [B, H, L, D] (HF's
`DynamicLayer.keys` / `.values`), and `mask` [B, L] marks real (1) and padding (0) columns; rows are
*left*-padded, so every row's next token is written at the same column L and one forward feeds the
whole batch. A joining group is prefilled on its own (its own left-padded batch, positions counted
from its first real token), then both caches are left-padded to the longer length and concatenated
along the batch. A leaving row is dropped with an index select, and columns that are padding in every
remaining row are cut from the left so the cache never grows past the longest live row.

Positions are explicit: a row's next token sits at position = its count of real tokens so far, so
rotary embeddings never see padding, whatever column the row's tokens occupy. The 2-D mask is passed
to the model, which is also what `finesteer.hooks.CallTracker` reads to find each row's real and last
positions, so scoped edits see the same positions as in `finesteer generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from finesteer.errors import FinesteerError
from finesteer.models.loading import LoadedModel


class CacheLayoutError(FinesteerError, RuntimeError):
    """The model's KV cache is not a plain dynamic cache whose rows can be spliced."""


def layer_tensors(cache: object) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) of every layer of a HF `DynamicCache` (each [B, H, L, D])."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CacheLayoutError(f"unsupported KV cache {type(cache).__name__}: expected a DynamicCache")
    out = []
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise CacheLayoutError(
                f"cache layer {type(layer).__name__} cannot be spliced (sliding-window or static caches "
                "are not supported by the server's continuous batching)"
            )
        out.append((layer.keys, layer.values))
    return out


def new_cache(lm: LoadedModel) -> object:
    """An empty HF DynamicCache laid out for `lm` (one layer object per decoder layer)."""
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


def check_cache_layout(lm: LoadedModel) -> None:
    """Refuse, at server start, models whose cache layers cannot be spliced (sliding windows)."""
    for layer in getattr(new_cache(lm), "layers", []):
        if getattr(layer, "is_sliding", False):
            raise CacheLayoutError(
                f"{lm.name} uses sliding-window attention layers; the server's continuous batching "
                "supports full-attention dynamic caches only"
            )


def _left_pad(t: Tensor, extra: int, dim: int) -> Tensor:
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
    return F.pad(t, pad)


@dataclass
class KVBatch:
    """A cache object plus its [B, L] real-token mask; mutated in place by join / keep."""

    cache: object
    mask: Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> Tensor:
        """[B, 1] position of each row's next token (its number of real tokens so far)."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self) -> Tensor:
        """The [B, L + 1] attention mask of a decoding step (the new token is real in every row)."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

    def advance(self) -> None:
        """Record that a decoding step appended one real column to every row."""
        self.mask = self.step_mask()

    def truncate(self) -> None:
        """Drop cache columns beyond the mask (a step that failed half-way through the layers)."""
        for layer in self.cache.layers:  # type: ignore[attr-defined]
            if getattr(layer, "keys", None) is not None and layer.keys.shape[2] > self.length:
                layer.keys = layer.keys[:, :, : self.length]
                layer.values = layer.values[:, :, : self.length]

    def join(self, other: KVBatch) -> None:
        """Append `other`'s rows (after this batch's), left-padding the shorter side."""
        length = max(self.length, other.length)
        mine, theirs = length - self.length, length - other.length
        layers = self.cache.layers  # type: ignore[attr-defined]
        for layer, (k1, v1), (k2, v2) in zip(
            layers, layer_tensors(self.cache), layer_tensors(other.cache), strict=True
        ):
            layer.keys = torch.cat([_left_pad(k1, mine, 2), _left_pad(k2, theirs, 2)], dim=0)
            layer.values = torch.cat([_left_pad(v1, mine, 2), _left_pad(v2, theirs, 2)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, mine, 1), _left_pad(other.mask, theirs, 1)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order) and cut the columns that are now padding in every row."""
        if rows == list(range(self.size)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:  # type: ignore[attr-defined]
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
