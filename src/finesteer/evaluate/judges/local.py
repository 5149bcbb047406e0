"""Rubric judge over a local generation callable (e.g. a chat model loaded in this process)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from finesteer.evaluate.judges.prompts import HARMFULNESS
from finesteer.evaluate.judges.rubric import ChatMessages, Rubric, RubricJudge

__all__ = ["LocalModelJudge"]


class LocalModelJudge(RubricJudge):
    """Rubric judge backed by a local generation callable.

    ``generate_fn`` takes a list of (system, user) message pairs and returns one reply text per pair,
    in order (the caller applies the chat template and sampling settings). For ``n_samples > 1`` each
    pair is repeated in the batch, so ``generate_fn`` should sample. ``batch_size`` caps the pairs per
    call. Parsing, retries and averaging are exactly those of :class:`LLMJudge`.
    """

    def __init__(
        self,
        generate_fn: Callable[[list[ChatMessages]], list[str]],
        rubric: Rubric = HARMFULNESS,
        *,
        n_samples: int = 1,
        max_parse_retries: int = 2,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(rubric, n_samples=n_samples, max_parse_retries=max_parse_retries)
        if not callable(generate_fn):
            raise TypeError("generate_fn must be callable: list[(system, user)] -> list[str]")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.generate_fn = generate_fn
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"LocalModelJudge(rubric={self.rubric.name!r}, n_samples={self.n_samples})"

    def _complete(self, messages: Sequence[ChatMessages], counts: Sequence[int]) -> list[list[str]]:
        flat = [m for m, c in zip(messages, counts, strict=True) for _ in range(c)]
        step = self.batch_size or max(1, len(flat))
        texts: list[str] = []
        for start in range(0, len(flat), step):
            chunk = flat[start : start + step]
            out = list(self.generate_fn(chunk))
            if len(out) != len(chunk):
                raise ValueError(f"generate_fn returned {len(out)} texts for {len(chunk)} message pairs")
            texts.extend(t if isinstance(t, str) else "" for t in out)
        grouped: list[list[str]] = []
        pos = 0
        for c in counts:
            grouped.append(texts[pos : pos + c])
            pos += c
        return grouped
