"""Continuous batching across interventions: one decode loop, each row with its own edit.

One worker thread owns the model. Between decoding steps it admits waiting requests (up to
`max_batch` rows): they are prefilled together as their own left-padded batch, with
`Intervention.per_row` giving each row its request's edit, and their KV cache is spliced into the
running batch (`KVBatch.join`). Every step then feeds each row's last token in one forward, again
under the per-row intervention of exactly the rows present, and finished or cancelled rows leave.

Interventions are entered with `intervene` around each single forward call and left before the
thread does anything else, so no hook outlives a step, whatever fails. Scopes resolve as in
`finesteer generate`: the hooks' `CallTracker` reads the explicit 2-D mask, so at prefill `last` is
each row's last prompt token and each decoding step's single new token is a generated position.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.serve.kvbatch import KVBatch, check_cache_layout, new_cache
from finesteer.serve.sampling import SamplingParams, next_token
from finesteer.serve.text import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """New text of a streaming request."""

    text: str


@dataclass(frozen=True)
class Done:
    """A finished request: its whole text, why it stopped, and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """A request the engine could not run (the server answers 500)."""

    error: BaseException


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    """One request inside the engine. `emit` must be thread-safe (the engine thread calls it)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    intervention: Intervention | None = None
    stream: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)
    text: TextStream | None = field(default=None, repr=False)
    pending: int = -1
    finish_reason: str | None = None
    seq: int = -1  # the engine's admission number: identifies the row while it lives

    def cancel(self) -> None:
        """Ask the engine to drop this row at the next step (client went away)."""
        self.cancelled = True


def _eos_ids(lm: LoadedModel) -> set[int]:
    """The token ids that end a reply, as HF `generate` reads them (generation_config first)."""
    config = getattr(lm.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class Engine:
    """The batching loop. `submit` from any thread; results arrive through each job's `emit`."""

    def __init__(self, lm: LoadedModel, *, max_batch: int = 16, batch_wait_s: float = 0.002) -> None:
        self.lm = lm
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.eos = _eos_ids(lm)
        # transformers ≥ 5.x names the cache argument `cache`; older versions `past_key_values`
        params = inspect.signature(lm.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        check_cache_layout(lm)
        self.steps = 0  # decoding steps run (shared by all rows of a batch)
        self.peak_rows = 0  # largest batch seen
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._rows: list[Job] = []
        self._batch: KVBatch | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._per_row: tuple[tuple[int, ...], Intervention] = ((), Intervention())
        self._seq = itertools.count()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="finesteer-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        job.seq = next(self._seq)
        job.generator = job.params.generator(self.lm.device)
        job.text = TextStream(self.lm.tokenizer, job.params.stop)
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    @property
    def active(self) -> int:
        return len(self._rows) + len(self._waiting)

    # --- loop --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            joining = self._admit()
            if joining is None:
                self._fail_all(RuntimeError("the server is shutting down"))
                return
            try:
                if joining:
                    self._prefill(joining)
                if self._rows:
                    self._decode()
            except Exception as exc:  # a bug in the loop itself: fail the batch, keep serving
                log.exception("engine step failed")
                self._fail_all(exc, joining)

    def _fail_all(self, error: BaseException, also: list[Job] | None = None) -> None:
        """Fail every row (and `also`, and on shutdown every waiting job); the batch is dropped."""
        with self._wake:
            waiting = list(self._waiting) if self._stop else []
            if self._stop:
                self._waiting.clear()
        failed = {job.seq: job for job in [*self._rows, *(also or []), *waiting] if job.finish_reason is None}
        for job in failed.values():
            job.finish_reason = "error"
            job.emit(Failed(error))
        self._rows, self._batch = [], None

    def _admit(self) -> list[Job] | None:
        """Take waiting jobs that fit; block while there is nothing at all to do (None = stop)."""
        with self._wake:
            while not self._stop and not self._waiting and not self._rows:
                self._wake.wait()
            if self._stop:
                return None
            if not self._rows and self.batch_wait_s > 0:
                # idle: let requests sent together arrive together (one prefill, one batch)
                self._wake.wait(self.batch_wait_s)
            room = self.max_batch - len(self._rows)
            joining = []
            while self._waiting and len(joining) < room:
                job = self._waiting.popleft()
                if not job.cancelled:
                    joining.append(job)
            return joining

    def _steered(self, jobs: list[Job]) -> Any:
        """`intervene` with row i of the batch getting jobs[i]'s edit (nothing when none has one).

        The per-row intervention is rebuilt only when the batch's rows change (join or leave).
        """
        if all(job.intervention is None for job in jobs):
            return nullcontext()
        key = tuple(job.seq for job in jobs)
        if self._per_row[0] != key:
            combined = Intervention.per_row([job.intervention or Intervention() for job in jobs])
            self._per_row = (key, combined)
        return intervene(self.lm, self._per_row[1])

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the joining jobs' prompts as one left-padded batch and splice them into the batch."""
        device = self.lm.device
        longest = max(len(job.prompt_ids) for job in jobs)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(jobs), longest), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(jobs), longest), dtype=torch.long, device=device)
        for i, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[i, longest - n :] = torch.tensor(job.prompt_ids, dtype=torch.long, device=device)
            mask[i, longest - n :] = 1
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
        cache = new_cache(self.lm)
        try:
            with self._steered(jobs), torch.no_grad():
                out = self.lm.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_arg: cache},
                )
        except Exception as exc:
            if len(jobs) > 1:  # find the culprit: the others still run
                for job in jobs:
                    self._prefill([job])
                return
            log.exception("prefill failed")
            jobs[0].finish_reason = "error"
            jobs[0].emit(Failed(exc))
            return
        group = KVBatch(cache, mask)
        if self._batch is None:
            self._batch = group
        else:
            self._batch.join(group)
        self._rows.extend(jobs)
        self.peak_rows = max(self.peak_rows, len(self._rows))
        self._take(out.logits[:, -1, :], jobs)

    def _forward_step(self, rows: list[Job], steering: Any) -> Tensor:
        """Feed each row's pending token under `steering`; returns the [B, vocab] next-token logits."""
        batch = self._batch
        assert batch is not None
        ids = torch.tensor([[job.pending] for job in rows], dtype=torch.long, device=self.lm.device)
        with steering, torch.no_grad():
            out = self.lm.model(
                input_ids=ids,
                attention_mask=batch.step_mask(),
                position_ids=batch.positions(),
                use_cache=True,
                **{self._cache_arg: batch.cache},
            )
        return out.logits[:, -1, :]

    def _decode(self) -> None:
        """One step: feed every row's pending token, sample the next ones, drop finished rows."""
        batch = self._batch
        assert batch is not None
        rows = self._rows
        try:
            logits = self._forward_step(rows, self._steered(rows))
        except Exception as exc:
            batch.truncate()
            self._isolate_failure(rows, exc)
            return
        batch.advance()
        self.steps += 1
        self._take(logits, rows)

    def _isolate_failure(self, rows: list[Job], error: Exception) -> None:
        """After a failed step, find the rows whose own intervention fails and fail only those.

        Each steered row is retried alone (its edit on its row, the others unsteered; the cache is
        cut back after every try). The rows that pass stay in the batch and redo the step next time.
        If no single row explains the failure, the whole batch fails.
        """
        batch = self._batch
        assert batch is not None
        culprits = []
        for i, job in enumerate(rows):
            if job.intervention is None:
                continue
            alone = [job.intervention if j == i else Intervention() for j in range(len(rows))]
            try:
                self._forward_step(rows, intervene(self.lm, Intervention.per_row(alone)))
            except Exception:
                culprits.append(i)
            batch.truncate()
        if not culprits:
            log.error("decoding step failed; failing the %d requests in the batch", len(rows))
            self._fail_all(error)
            return
        for i in culprits:
            log.error("request %d failed in a decoding step: %s", rows[i].seq, error)
            rows[i].finish_reason = "error"
            rows[i].emit(Failed(error))
        keep = [i for i in range(len(rows)) if i not in culprits]
        if not keep:
            self._rows, self._batch = [], None
            return
        batch.keep(keep)
        self._rows = [rows[i] for i in keep]

    def _take(self, logits: Tensor, jobs: list[Job]) -> None:
        """Sample each job's next token (logits row i is jobs[i]), then let finished rows leave."""
        logits = logits.float()
        eos = sorted(self.eos)
        for offset, job in enumerate(jobs):
            if eos and job.text is not None and len(job.text.tokens) < job.params.min_tokens:
                logits[offset, eos] = float("-inf")
            self._advance(job, next_token(logits[offset], job.params, job.generator))
        keep = [i for i, job in enumerate(self._rows) if job.finish_reason is None and not job.cancelled]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._batch = [], None
            return
        assert self._batch is not None
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _advance(self, job: Job, token: int) -> None:
        """Record one sampled token for a job: emit text, decide whether it is finished."""
        assert job.text is not None
        job.pending = token
        if token in self.eos:
            job.finish_reason = "stop"
            job.text.tokens.append(token)
        else:
            piece = job.text.feed(token, need_text=job.stream)
            if piece and job.stream:
                job.emit(Delta(piece))
            if job.text.stopped:
                job.finish_reason = "stop"
        if job.finish_reason is None and len(job.text.tokens) >= job.params.max_tokens:
            job.finish_reason = "length"
        if job.finish_reason is not None:
            rest = job.text.finish()
            if rest and job.stream:
                job.emit(Delta(rest))
            job.emit(Done(job.text.text(), job.finish_reason, len(job.prompt_ids), len(job.text.tokens)))
