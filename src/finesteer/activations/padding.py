"""Token lists to one padded batch: the one place finesteer pads by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

PadSide = Literal["right", "left"]


def pad(sequences: Sequence[Sequence[int]], side: PadSide, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), both long [N, longest]: each row's tokens, then (right) or
    before them (left) `pad_id` with mask 0.

    Right padding keeps every real token at its unpadded position (captures, scoring forwards);
    left padding lines up the last tokens (generation).
    """
    if side not in ("right", "left"):
        raise ValueError(f"pad side must be 'right' or 'left', got {side!r}")
    width = max(len(tokens) for tokens in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        span = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
        input_ids[row, span] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask
