"""What attribution estimates: per-prompt metrics of the last-position logits, and the error type.

First-order metrics (`TokenLogProb`, `LetterMargin`) have a value whose gate gradient is the estimate
and an exact counterpart as a scan readout (`MetricReadout`); `KLDivergence` is second order (its value
and gradient vanish at the unablated model) and is estimated through the Fisher information.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from finesteer.errors import FinesteerError
from finesteer.locate.engine import LastPosition, Readout

DEFAULT_OUTCOMES = 2


class AttributionError(FinesteerError, ValueError):
    """Attribution that cannot run: bad metric targets, a metric without gradient, NaN estimates."""


class Metric(ABC):
    """A per-prompt differentiable function of the last-position logits (higher = more behaviour)."""

    order: int = 1

    @abstractmethod
    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        """[batch] metric of each row; `rows` are the prompt indices of the batch rows."""

    @abstractmethod
    def key(self) -> str:
        """Short description recorded with the scores."""


class TokenLogProb(Metric):
    """log Σ_{t ∈ tokens} p(t) at the last position: e.g. the refusal tokens ("I", "Sorry", …)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        ids = sorted({int(t) for t in token_ids})
        if not ids:
            raise AttributionError("TokenLogProb needs at least one token id")
        if ids[0] < 0:
            raise AttributionError(f"token ids must be ≥ 0, got {ids[0]}")
        self.token_ids = torch.tensor(ids)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        if int(self.token_ids.max()) >= logits.shape[-1]:
            raise AttributionError(f"token id {int(self.token_ids.max())} ≥ vocab size {logits.shape[-1]}")
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(log_probs[:, self.token_ids.to(logits.device)], dim=-1)

    def key(self) -> str:
        return f"log_prob_of_tokens:{','.join(map(str, self.token_ids.tolist()))}"


class LetterMargin(Metric):
    """A/B letter margin per prompt: logit(matching letter) − logsumexp(logits of the other options).

    `matching[i]` is prompt i's matching-letter token id and `others[i]` its other options' ids
    (two options: the plain logit difference).
    """

    def __init__(self, matching: Sequence[int], others: Sequence[Sequence[int]]) -> None:
        if not matching or len(matching) != len(others):
            raise AttributionError(
                f"LetterMargin needs one matching id and its other options per prompt, got "
                f"{len(matching)} and {len(others)}"
            )
        for i, (m, rest) in enumerate(zip(matching, others, strict=True)):
            if not rest or int(m) in {int(o) for o in rest}:
                raise AttributionError(
                    f"prompt {i}: other options {list(rest)} must be non-empty, without {m}"
                )
        self.matching = [int(m) for m in matching]
        self.others = [[int(o) for o in rest] for rest in others]

    @classmethod
    def from_targets(cls, targets: Sequence[Any]) -> LetterMargin:
        """From `finesteer.scoring.ab.LetterTarget`s (their option ids and matching index)."""
        matching = [t.option_ids[t.matching_index] for t in targets]
        others = [[o for j, o in enumerate(t.option_ids) if j != t.matching_index] for t in targets]
        return cls(matching, others)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        out = []
        for row, prompt in enumerate(rows.tolist()):
            if prompt >= len(self.matching):
                raise AttributionError(
                    f"LetterMargin has targets for {len(self.matching)} prompts, not {prompt + 1}"
                )
            z = logits[row].float()
            out.append(z[self.matching[prompt]] - torch.logsumexp(z[self.others[prompt]], dim=0))
        return torch.stack(out)

    def key(self) -> str:
        return f"letter_margin:{len(self.matching)}"


class KLDivergence(Metric):
    """KL(p_base ‖ p_ablated) at the last position, estimated to second order over `outcomes` tokens."""

    order = 2

    def __init__(self, outcomes: int = DEFAULT_OUTCOMES) -> None:
        if outcomes < 1:
            raise AttributionError(f"outcomes must be ≥ 1, got {outcomes}")
        self.outcomes = int(outcomes)

    def values(self, logits: Tensor, rows: Tensor) -> Tensor:
        raise AttributionError("KL from the base is 0 at the base; it has no first-order value to read")

    def key(self) -> str:
        return f"kl_second_order:{self.outcomes}"


REFUSAL_OPENINGS: tuple[str, ...] = ("I", "Sorry", "As", "Unfortunately", "I'm", "Cannot")


def refusal_token_ids(tokenizer: Any, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """First token of each typical refusal opening, as the response's first token (a `TokenLogProb`
    over them is the log-probability that the answer starts like a refusal)."""
    ids = []
    for text in openings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise AttributionError(f"refusal opening {text!r} tokenises to nothing")
        ids.append(int(tokens[0]))
    return sorted(set(ids))


class MetricReadout(Readout):
    """A metric as a scan readout, so the exact ablation effect uses the same code as the estimate."""

    needs_logits = True

    def __init__(self, metric: Metric) -> None:
        if metric.order != 1:
            raise AttributionError(f"{metric.key()} has no exact readout of its own")
        self.metric = metric

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.logits is not None
        with torch.no_grad():
            return self.metric.values(out.logits, out.rows).double()

    def key(self) -> str:
        return f"metric:{self.metric.key()}"
