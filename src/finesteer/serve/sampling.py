"""Per-request decoding: greedy or seeded temperature / top-p sampling from one row's logits.

Each request draws from its own `torch.Generator`, so a seeded request takes the same random draws
whether it runs alone or shares a batch with others (the batch never touches the process RNG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from finesteer.errors import FinesteerError


class SamplingError(FinesteerError, ValueError):
    """Sampling parameters out of range (the server answers 400)."""


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's decoding fields; temperature 0 means greedy (argmax, as `finesteer generate`).

    `min_tokens` (vLLM's extra field, HF's `min_new_tokens`) forbids end-of-sequence before that many
    tokens, so benchmarks can generate exactly `max_tokens` tokens.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be ≥ 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise SamplingError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingError(f"min_tokens must be between 0 and max_tokens, got {self.min_tokens}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise SamplingError("stop takes at most 4 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A private RNG for this request (None when greedy); seeded when `seed` is given."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(int(self.seed))
        else:
            gen.seed()
        return gen


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from one row's [vocab] logits."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
