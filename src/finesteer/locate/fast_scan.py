"""The exact fast scan engine: candidates batched into rows, with the unchanged prefix of layers reused.

Same interface, readouts and checkpoint folder format as `finesteer.locate.scan.scan`, same numbers
(up to float32 rounding of different batch shapes; tests hold it to 1e-5). Two things make it fast:

- **Per-row candidates.** Each forward carries several candidates × the prompts of one batch as its
  rows (`Intervention.on_rows`, one edit per candidate covering its rows), so the model runs big
  batches instead of one small forward per candidate.
- **Prefix reuse.** A candidate whose first edit sits in layer l changes nothing before layer l. One
  plain forward per prompt batch records what every decoder layer receives; layer-l candidates then
  run only layers l..L−1, the final norm and the unembedding on that recorded input, expanded to the
  candidate rows (`finesteer.locate.replay`).

The HSI sweep's `finesteer.scoring.ab.ABScorer` (`reuse_prefix=1`) is the same idea along the other
axis: its edits (scope "last") touch only the final token, so it reuses the KV cache of every earlier
token and runs one token per candidate row. Ships/Sahara ablations act at every position, so here
the reusable prefix is the stack of layers before the first edit instead.

The replay is checked once per scan against the model's own forward (`finesteer.locate.replay.check_replay`),
so a model whose forward does something the replay misses fails loudly (use `engine="simple"`)
instead of giving wrong scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from finesteer.interventions.edit import Intervention
from finesteer.locate.engine import (
    EncodedPrompts,
    LastPosition,
    PromptBatch,
    Readout,
    ScanEngine,
    ScanError,
    prompt_batches,
)
from finesteer.locate.replay import RecordedPrefix, RecordedPrefixes, replay_layers
from finesteer.locate.scan import SimpleScan, scan
from finesteer.models.loading import LoadedModel

DEFAULT_MAX_ROWS = 64
DEFAULT_PREFIX_BYTES = 2 * 1024**3


def start_layer(intervention: Intervention, n_layers: int) -> int:
    """First decoder layer an intervention can change (n_layers: only the final norm, or nothing)."""
    layers = [
        n_layers if edit.site.component == "ln_final" else edit.site.layer
        for edit in intervention.edits
        if not edit.op.is_identity()
    ]
    return min(layers, default=n_layers)


def _blocks(order: list[int], starts: list[int], per_chunk: int, at_least: int) -> list[list[list[int]]]:
    """Candidates (sorted by start layer) cut into chunks of one start layer and ≤ per_chunk, then
    grouped into blocks of ≥ at_least candidates: a block's results are checkpointed together."""
    chunks: list[list[int]] = []
    for index in order:
        if chunks and len(chunks[-1]) < per_chunk and starts[chunks[-1][0]] == starts[index]:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    blocks: list[list[list[int]]] = [[]]
    for chunk in chunks:
        if sum(len(c) for c in blocks[-1]) >= at_least:
            blocks.append([])
        blocks[-1].append(chunk)
    return [b for b in blocks if b]


def _chunk_intervention(candidates: Sequence[Intervention], rows_each: int) -> Intervention:
    """Candidate i on rows i*rows_each … (i+1)*rows_each − 1: one edit per candidate, not per row."""
    total = Intervention()
    for i, candidate in enumerate(candidates):
        total = total + candidate.on_rows(range(i * rows_each, (i + 1) * rows_each))
    return total


def _run_chunk(
    lm: LoadedModel, prefix: RecordedPrefix, chunk: Sequence[Intervention], start: int, readout: Readout
) -> Iterator[Tensor]:
    """Readout values [batch, …] of each candidate of a chunk on one prompt batch."""
    batch = prefix.batch
    size = int(batch.input_ids.shape[0])
    if start == lm.info.n_layers and all(c.is_identity() for c in chunk):
        part = readout(LastPosition(prefix.logits, prefix.hidden, batch.rows))
        for _ in chunk:
            yield part
        return
    index = torch.arange(size).repeat(len(chunk))
    logits, hidden = replay_layers(
        lm, prefix, start, index, _chunk_intervention(chunk, size), need_logits=readout.needs_logits
    )
    values = readout(LastPosition(logits, hidden if readout.needs_hidden else None, batch.rows[index]))
    yield from values.split(size)


class PrefixCache:
    """The recorded prefixes of one prompt set (every layer), kept across scans: the rounds of adaptive
    verification then share one plain forward per batch instead of repeating it each round."""

    def __init__(
        self, lm: LoadedModel, encoded: EncodedPrompts, batch_size: int, max_bytes: int = DEFAULT_PREFIX_BYTES
    ) -> None:
        self.key = (encoded.texts_hash, len(encoded), batch_size)
        self.batches: list[PromptBatch] = prompt_batches(
            encoded, batch_size, lm.tokenizer.pad_token_id, lm.device
        )
        self.prefixes = RecordedPrefixes(lm, self.batches, set(range(lm.info.n_layers + 1)), max_bytes)


class FastScan(ScanEngine):
    """Candidates batched into rows, layers before each candidate's first edit reused (see the module).

    A forward carries at most `max_rows` rows (candidates × prompts of one batch; at least one
    candidate). Recorded prefixes are kept for the whole scan while they fit `max_prefix_bytes`.
    Finished candidates come in blocks of ≥ `checkpoint_every`, checkpointed together.
    """

    name = "fast"
    desc = "fast scan"

    def __init__(
        self,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_prefix_bytes: int = DEFAULT_PREFIX_BYTES,
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.max_prefix_bytes = max_prefix_bytes
        self.cache = prefixes

    def check(
        self, lm: LoadedModel, candidates: Sequence[Intervention], batch_size: int, checkpoint_every: int
    ) -> None:
        if batch_size < 1 or checkpoint_every < 1 or self.max_rows < 1:
            raise ScanError(
                f"batch_size, max_rows and checkpoint_every must be ≥ 1, got {batch_size}, {self.max_rows}, "
                f"{checkpoint_every}"
            )
        for i, candidate in enumerate(candidates):
            candidate.validate(lm.info)
            if any(edit.rows is not None for edit in candidate.edits):
                raise ScanError(
                    f"candidate {i} already targets batch rows; the fast scan assigns rows itself"
                )

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
        starts = [start_layer(c, lm.info.n_layers) for c in candidates]
        order = sorted(todo, key=lambda i: (starts[i], i))
        per_chunk = max(1, self.max_rows // batch_size)
        if not order:
            return
        if self.cache is not None and self.cache.key == (encoded.texts_hash, len(encoded), batch_size):
            batches, prefixes = self.cache.batches, self.cache.prefixes
        else:
            batches = prompt_batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
            prefixes = RecordedPrefixes(lm, batches, {starts[i] for i in order}, self.max_prefix_bytes)
        for block in _blocks(order, starts, per_chunk, checkpoint_every):
            values: dict[int, Tensor] = {}
            block_starts = {starts[chunk[0]] for chunk in block}
            for b, batch in enumerate(batches):
                prefix = prefixes.get(b, block_starts)
                for chunk in block:
                    parts = _run_chunk(lm, prefix, [candidates[i] for i in chunk], starts[chunk[0]], readout)
                    for index, part in zip(chunk, parts, strict=True):
                        if index not in values:
                            values[index] = torch.empty((len(encoded), *part.shape[1:]), dtype=part.dtype)
                        values[index][batch.rows] = part
            yield {index: values[index] for chunk in block for index in chunk}


def fast_scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    candidates: Sequence[Intervention],
    readout: Readout,
    *,
    batch_size: int = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_prefix_bytes: int = DEFAULT_PREFIX_BYTES,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 8,
    progress: bool = True,
    desc: str = "fast scan",
    on_candidate: Callable[[int], None] | None = None,
    prefixes: PrefixCache | None = None,
) -> Tensor:
    """Readout of every prompt under every candidate: [n_candidates, n_prompts, …], like `scan`
    (`FastScan`; checkpoints use `scan`'s folder format, so a scan can be resumed by either engine).
    `prefixes`: recorded prefixes to reuse across scans of the same prompts and batch size."""
    return FastScan(max_rows, max_prefix_bytes, prefixes).run(
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


ENGINES: Mapping[str, type[ScanEngine]] = MappingProxyType({"simple": SimpleScan, "fast": FastScan})
"""The scan engines by name (`run_scan`'s `engine`)."""


def run_scan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    candidates: Sequence[Intervention],
    readout: Readout,
    *,
    engine: str = "fast",
    max_rows: int = DEFAULT_MAX_ROWS,
    **options: Any,
) -> Tensor:
    """`scan` (engine='simple', one hooked forward per candidate) or `fast_scan` (engine='fast')."""
    if engine == "simple":
        return scan(lm, prompts, candidates, readout, **options)
    if engine == "fast":
        return fast_scan(lm, prompts, candidates, readout, max_rows=max_rows, **options)
    raise ScanError(f"unknown scan engine '{engine}'; choose one of {', '.join(ENGINES)}")
