"""Which token positions an edit touches, resolved per forward call (KV cache and padding aware)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from finesteer.errors import FinesteerError
from finesteer.hooks import CallContext

ScopeKind = Literal["all", "last", "prompt", "generated", "from", "from_end"]


class ScopeError(FinesteerError, ValueError):
    """A position scope that cannot be parsed or applied."""


@dataclass(frozen=True)
class Scope:
    """Position selection.

    - all: every real token; last: each row's last real token in each forward call (the last prompt
      token at prefill, then every generated token: HSI/ITI); prompt / generated: tokens before /
      from the prompt's end; from: tokens whose index is ≥ `start` (CAA: from the answer onward),
      `start` may give one index per batch row; from_end: the last `start` prompt tokens and every
      generated token (CAA's "from the end of the instruction": the chat template puts a fixed number
      of tokens after the user's text, so one value fits every row).
    """

    kind: ScopeKind = "all"
    start: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("all", "last", "prompt", "generated", "from", "from_end"):
            raise ScopeError(
                f"unknown scope '{self.kind}'; choose all, last, prompt, generated, from:N or from_end:K"
            )
        if (self.kind in ("from", "from_end")) != (self.start is not None):
            raise ScopeError("scopes 'from' and 'from_end' need index(es), and only they take them")
        if self.kind == "from" and (not self.start or min(self.start) < 0):
            raise ScopeError(f"scope 'from' takes token indices ≥ 0 (from:N), got {self.start}")
        if self.kind == "from_end" and (len(self.start or ()) != 1 or (self.start or (0,))[0] < 0):
            raise ScopeError("scope 'from_end' takes one count K ≥ 0 (from_end:K)")

    @classmethod
    def parse(cls, value: str | Scope) -> Scope:
        if isinstance(value, Scope):
            return value
        text = value.strip()
        for prefix in ("from_end:", "from:"):
            if text.startswith(prefix):
                try:
                    starts = tuple(int(p) for p in text[len(prefix) :].split(","))
                except ValueError as exc:
                    raise ScopeError(
                        f"cannot parse scope '{value}': write from:N, from:N1,N2,… or from_end:K"
                    ) from exc
                return cls(prefix[:-1], starts)  # type: ignore[arg-type]
        return cls(text)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.kind if self.start is None else f"{self.kind}:" + ",".join(map(str, self.start))

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
        if self.kind == "from_end":
            return ctx.real & (ctx.index >= (ctx.prompt_len - self.start[0])[:, None])
        start = torch.tensor(self.start, device=ctx.index.device)
        if start.numel() not in (1, ctx.batch_size):
            raise ScopeError(
                f"scope {self} gives {start.numel()} start indices for a batch of {ctx.batch_size}"
            )
        return ctx.real & (ctx.index >= start.reshape(-1, 1))
