"""The simple scan engine: run the model once per (candidate intervention, prompt batch) and keep a
readout of the last prompt position for every candidate.

This is the reference path every faster engine (batched per-row ablations, prefix reuse, gradient
pre-ranking) is compared against, so it does the obvious thing: for each candidate, apply it with
`intervene` and run plain forwards over right-padded batches. Finished candidates are checkpointed
to a folder and a rerun with the same folder skips them, so a long scan survives being killed.

    encoded = encode_prompts(lm, prompts)
    base = scan(lm, encoded, [Intervention()], LastLogits())[0]             # [P, vocab]
    kl = scan(lm, encoded, candidates, KLFromBase(base), checkpoint=run / "scan")  # [C, P]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from finesteer.hooks import CallContext, HookSet
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.locate.engine import (
    EncodedPrompts,
    LastPosition,
    PromptBatch,
    Readout,
    ScanEngine,
    ScanError,
    last_logits,
    prompt_batches,
)
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site


class LastLogProbs(Readout):
    """Next-token log-probabilities at the last prompt position, [P, vocab] per candidate.

    Large for big vocabularies (32 prompts × 152k × 4 bytes = 19 MB per candidate): use it for the
    base run and reduce per candidate with `KLFromBase`.
    """

    needs_logits = True

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.logits is not None
        return torch.log_softmax(out.logits.float(), dim=-1)

    def key(self) -> str:
        return "last_log_probs"


class LastLogits(Readout):
    """Raw next-token logits at the last prompt position, [P, vocab] per candidate (float32)."""

    needs_logits = True

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.logits is not None
        return out.logits.float()

    def key(self) -> str:
        return "last_logits"


class LastHidden(Readout):
    """Final-norm hidden state of the last prompt token, [P, hidden] per candidate (Sahara's input)."""

    needs_hidden = True

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.hidden is not None
        return out.hidden.float()

    def key(self) -> str:
        return "last_hidden"


class KLFromBase(Readout):
    """KL(p_base ‖ p_candidate) of the next-token distribution at the last position, [P] per candidate.

    `base_logits` are the unablated model's last-position logits (`LastLogits`; log-probs work too,
    log-softmax ignores the shift). Both sides go through the same float64 log-softmax (exactly
    normalised, so the authors' 1e-12 smoothing is not needed): the KL is ≥ 0 up to float64 rounding
    and exactly 0 when the candidate changes nothing.
    """

    needs_logits = True

    def __init__(self, base_logits: Tensor) -> None:
        if base_logits.dim() != 2:
            raise ScanError(f"base logits must be [prompts, vocab], got {tuple(base_logits.shape)}")
        if not bool(torch.isfinite(base_logits).all()):
            raise ScanError("base logits contain NaN/inf")
        self.base = torch.log_softmax(base_logits.double(), dim=-1)
        self._key = hashlib.sha256(self.base.numpy().tobytes()).hexdigest()[:16]

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.logits is not None
        base = self.base[out.rows]
        if base.shape[-1] != out.logits.shape[-1]:
            raise ScanError(f"base has vocab {base.shape[-1]}, the model gives {out.logits.shape[-1]}")
        ablated = torch.log_softmax(out.logits.double(), dim=-1)
        if not bool(torch.isfinite(ablated).all()):
            raise ScanError(f"the model produced NaN/inf logits for prompts {out.rows.tolist()}")
        return (base.exp() * (base - ablated)).sum(-1)

    def key(self) -> str:
        return f"kl_from_base:{self._key}"


class KLAndHidden(Readout):
    """Both Ships readouts from one forward: [P, 1 + hidden] per candidate (float64).

    Column 0 is `KLFromBase`, the rest is `LastHidden`: query- and dataset-level scores then cost one
    scan instead of two.
    """

    needs_logits = True
    needs_hidden = True

    def __init__(self, base_logits: Tensor) -> None:
        self.kl = KLFromBase(base_logits)

    def __call__(self, out: LastPosition) -> Tensor:
        assert out.hidden is not None
        return torch.cat([self.kl(out)[:, None], out.hidden.double()], dim=1)

    def key(self) -> str:
        return f"kl_and_hidden:{self.kl.key()}"


def _forward(lm: LoadedModel, batch: PromptBatch, readout: Readout) -> Tensor:
    """One forward; logits only at each row's last real position (not the whole vocab × sequence)."""
    captured: dict[str, Tensor] = {}
    batch_rows = torch.arange(batch.last.shape[0], device=batch.last.device)

    def read_hidden(act: Tensor, ctx: CallContext) -> None:
        captured["hidden"] = act[batch_rows, batch.last].detach()

    with HookSet(lm.model, lm.adapter) as hooks:
        if readout.needs_hidden:
            hooks.add(Site(lm.info.n_layers - 1, "ln_final"), read_hidden)
        with torch.no_grad():
            output = last_logits(lm, batch, logits=readout.needs_logits)
    logits = output.detach().float().cpu() if output is not None else None
    hidden = captured["hidden"].float().cpu() if readout.needs_hidden else None
    return readout(LastPosition(logits, hidden, batch.rows))


class SimpleScan(ScanEngine):
    """One hooked forward per (candidate, prompt batch): the reference every faster engine matches."""

    name = "simple"
    desc = "scan"

    def check(
        self, lm: LoadedModel, candidates: Sequence[Intervention], batch_size: int, checkpoint_every: int
    ) -> None:
        if batch_size < 1 or checkpoint_every < 1:
            raise ScanError(
                f"batch_size and checkpoint_every must be ≥ 1, got {batch_size}, {checkpoint_every}"
            )
        for candidate in candidates:
            candidate.validate(lm.info)

    def blocks(
        self,
        lm: LoadedModel,
        encoded: EncodedPrompts,
        candidates: Sequence[Intervention],
        todo: Sequence[int],
        readout: Readout,
        batch_size: int,
        checkpoint_every: int,
    ) -> Iterator[dict[int, Tensor]]:
        batches = prompt_batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
        for index in todo:
            values: Tensor | None = None
            with intervene(lm, candidates[index]):
                for batch in batches:
                    part = _forward(lm, batch, readout)
                    if values is None:
                        values = torch.empty((len(encoded), *part.shape[1:]), dtype=part.dtype)
                    values[batch.rows] = part
            assert values is not None
            yield {index: values}


def scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    candidates: Sequence[Intervention],
    readout: Readout,
    *,
    batch_size: int = 8,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    desc: str = "scan",
    on_candidate: Callable[[int], None] | None = None,
) -> Tensor:
    """Readout of every prompt under every candidate: [n_candidates, n_prompts, …].

    One hooked forward per (candidate, batch). With `checkpoint` (a folder), finished candidates are
    written every `checkpoint_every` candidates (and on any exception), and a rerun with the same
    folder, model, prompts, readout and candidates loads them instead of recomputing. `on_candidate`
    is called with each newly finished candidate's index (progress reporting, tests).
    """
    return SimpleScan().run(
        lm,
        prompts,
        candidates,
        readout,
        batch_size=batch_size,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=desc,
        on_candidate=on_candidate,
    )
