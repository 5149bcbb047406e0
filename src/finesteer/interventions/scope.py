"""Which token positions an edit touches, resolved per forward call (KV cache and padding aware)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from finesteer.hooks import CallContext

ScopeKind = Literal["all", "last", "prompt", "generated", "from"]


class ScopeError(ValueError):
    """A position scope that cannot be parsed or applied."""


@dataclass(frozen=True)
class Scope:
    """Position selection.

    - all: every real token; last: each row's last real token in each forward call (the last prompt
      token at prefill, then every generated token: HSI/ITI); prompt / generated: tokens before /
      from the prompt's end; from: tokens whose index is ≥ `start` (CAA: from the answer onward),
      `start` may give one index per batch row.
    """

    kind: ScopeKind = "all"
    start: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("all", "last", "prompt", "generated", "from"):
            raise ScopeError(f"unknown scope '{self.kind}'; choose all, last, prompt, generated or from:N")
        if (self.kind == "from") != (self.start is not None):
            raise ScopeError("scope 'from' needs start index(es), and only it takes them")

    @classmethod
    def parse(cls, value: str | Scope) -> Scope:
        if isinstance(value, Scope):
            return value
        text = value.strip()
        if text.startswith("from:"):
            try:
                starts = tuple(int(p) for p in text[5:].split(","))
            except ValueError as exc:
                raise ScopeError(f"cannot parse scope '{value}': write from:N or from:N1,N2,…") from exc
            return cls("from", starts)
        return cls(text)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.kind if self.start is None else "from:" + ",".join(map(str, self.start))

    def mask(self, ctx: CallContext) -> Tensor:
        """[B, S] bool mask of the positions to edit in this call."""
        if self.kind == "all":
            return ctx.real
        if self.kind == "last":
            return ctx.last_real() & ctx.real
        if self.kind == "prompt":
            return ctx.real & (ctx.index < ctx.prompt_len[:, None])
        if self.kind == "generated":
            return ctx.real & (ctx.index >= ctx.prompt_len[:, None])
        assert self.start is not None
        start = torch.tensor(self.start, device=ctx.index.device)
        if start.numel() not in (1, ctx.batch_size):
            raise ScopeError(
                f"scope {self} gives {start.numel()} start indices for a batch of {ctx.batch_size}"
            )
        return ctx.real & (ctx.index >= start.reshape(-1, 1))
