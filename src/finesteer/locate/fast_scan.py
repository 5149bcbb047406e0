"""The exact fast scan engine: candidates batched into rows, with the unchanged prefix of layers reused.

Same interface, readouts and checkpoint folder format as `finesteer.locate.scan.scan`, same numbers
(up to float32 rounding of different batch shapes; tests hold it to 1e-5). Two things make it fast:

- **Per-row candidates.** Each forward carries several candidates × the prompts of one batch as its
  rows (`Intervention.on_rows`, one edit per candidate covering its rows), so the model runs big
  batches instead of one small forward per candidate.
- **Prefix reuse.** A candidate whose first edit sits in layer l changes nothing before layer l. One
  plain forward per prompt batch records what every decoder layer receives (hidden state plus the
  mask / rotary / position keyword arguments, through forward pre-hooks); for layer-l candidates the
  stock decoder-layer modules l..L−1, the final norm and the unembedding are then called directly on
  that recorded input, expanded to the candidate rows. Nothing is forked: finesteer's site hooks sit
  on those modules and fire as usual, with the per-call position context fed through the same
  `CallTracker` the base model's pre-hook uses.

The HSI sweep's `finesteer.scoring.ab.ABScorer` (`reuse_prefix=1`) is the same idea along the other
axis: its edits (scope "last") touch only the final token, so it reuses the KV cache of every earlier
token and runs one token per candidate row. Ships/Sahara ablations act at every position, so here
the reusable prefix is the stack of layers before the first edit instead.

Per-layer keyword arguments are recorded per layer, so models whose layers get different masks or
rotary tables (Gemma 3 sliding/full attention) are handled. Each call replays two rows of one
recorded batch, swapped, and checks they reproduce the model's own outputs, so a model whose forward
does something the replay misses fails loudly (use `engine="simple"`) instead of giving wrong scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.locate.scan import (
    EncodedPrompts,
    LastPosition,
    Readout,
    ScanError,
    _Batch,
    _batches,
    _Checkpoint,
    _manifest,
    encode_prompts,
    intervention_key,
    scan,
)
from finesteer.models.loading import LoadedModel

ENGINES: tuple[str, ...] = ("simple", "fast")
DEFAULT_MAX_ROWS = 64
DEFAULT_PREFIX_BYTES = 2 * 1024**3
REPLAY_TOLERANCE = 1e-4


def start_layer(intervention: Intervention, n_layers: int) -> int:
    """First decoder layer an intervention can change (n_layers: only the final norm, or nothing)."""
    layers = [
        n_layers if edit.site.component == "ln_final" else edit.site.layer
        for edit in intervention.edits
        if not edit.op.is_identity()
    ]
    return min(layers, default=n_layers)


@dataclass
class _Call:
    """What one module received in the recorded forward: its hidden-state input and the rest."""

    hidden: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Prefix:
    """A prompt batch's recorded layer inputs (index n_layers = the final norm's input) and the base
    model's own last-position logits and final-norm states from that forward."""

    batch: _Batch
    calls: dict[int, _Call]
    logits: Tensor
    hidden: Tensor

    def nbytes(self) -> int:
        return sum(c.hidden.numel() * c.hidden.element_size() for c in self.calls.values())


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    if args:
        return _Call(args[0], tuple(args[1:]), dict(kwargs))
    if "hidden_states" not in kwargs:
        raise ScanError("fast scan: a decoder layer was called without hidden_states; use engine='simple'")
    rest = dict(kwargs)
    return _Call(rest.pop("hidden_states"), (), rest)


def _record(lm: LoadedModel, batch: _Batch, keep: set[int]) -> _Prefix:
    """One plain forward of a batch (the call `scan` makes, so its outputs are bit-identical) recording
    every layer's inputs from the first layer in `keep` on, hidden states only for layers in `keep`."""
    n_layers = lm.info.n_layers
    layers = lm.adapter.layer_list(lm.model)
    norm = lm.adapter.get(lm.model, lm.adapter.final_norm)
    calls: dict[int, _Call] = {}
    first = min(keep)
    captured: dict[str, Tensor] = {}
    rows = torch.arange(batch.last.shape[0], device=batch.last.device)

    def pre_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = _split_hidden(args, kwargs)
            if index not in keep:
                call.hidden = call.hidden[:0]  # later layers need their kwargs, not their states
            calls[index] = call

        return hook

    def read_norm(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        value = output[0] if isinstance(output, tuple) else output
        captured["hidden"] = value[rows, batch.last].detach()

    modules = [*(layers[i] for i in range(first, n_layers)), norm]
    handles = []
    positions = torch.unique(batch.last)
    try:
        for offset, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(pre_hook(first + offset), with_kwargs=True))
        handles.append(norm.register_forward_hook(read_norm))
        with torch.no_grad():
            output = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.mask,
                use_cache=False,
                logits_to_keep=positions,
            )
    finally:
        for handle in handles:
            handle.remove()
    column = torch.searchsorted(positions, batch.last)
    logits = output.logits[rows, column].detach().float().cpu()
    return _Prefix(batch, calls, logits, captured["hidden"].float().cpu())


def _expand(value: Any, index: Tensor, batch: int, memo: dict[int, Any]) -> Any:
    """Select `index` rows of every batch-dimensioned tensor (dim ≥ 2 whose first size is the batch);
    broadcast tensors (rotary tables of batch 1, 1-D positions) pass through unchanged."""
    if isinstance(value, Tensor):
        if value.dim() < 2 or value.shape[0] != batch:
            return value
        key = id(value)
        if key not in memo:
            memo[key] = value.index_select(0, index.to(value.device))
        return memo[key]
    if isinstance(value, tuple):
        return tuple(_expand(v, index, batch, memo) for v in value)
    if isinstance(value, list):
        return [_expand(v, index, batch, memo) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, index, batch, memo) for k, v in value.items()}
    return value


def _unembed(lm: LoadedModel, hidden: Tensor) -> Tensor:
    """Logits from final-norm states: the output embedding, plus Gemma-style final soft-capping."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise ScanError(f"{type(lm.model).__name__} has no output embedding; use engine='simple'")
    logits = head(hidden)
    config = lm.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _replay(
    lm: LoadedModel, prefix: _Prefix, start: int, index: Tensor, intervention: Intervention, need_logits: bool
) -> tuple[Tensor | None, Tensor]:
    """Run layers start..L−1, the final norm and the unembedding on `index` rows of the recorded
    batch with `intervention` applied; returns last-position (logits, final-norm states)."""
    batch = prefix.batch
    size = int(batch.input_ids.shape[0])
    memo: dict[int, Any] = {}
    index = index.to(batch.input_ids.device)
    layers = lm.adapter.layer_list(lm.model)
    base = lm.adapter.get(lm.model, lm.adapter.base_model)
    norm = lm.adapter.get(lm.model, lm.adapter.final_norm)
    ids, mask, last = batch.input_ids[index], batch.mask[index], batch.last[index]
    hidden = prefix.calls[start].hidden.index_select(0, index)
    with torch.no_grad(), intervene(lm, intervention) as hooks:
        hooks.tracker(base, (), {"input_ids": ids, "attention_mask": mask})
        for layer in range(start, lm.info.n_layers):
            call = prefix.calls[layer]
            out = layers[layer](
                hidden, *_expand(call.args, index, size, memo), **_expand(call.kwargs, index, size, memo)
            )
            hidden = out[0] if isinstance(out, tuple) else out
        final = prefix.calls[lm.info.n_layers]
        normed = norm(
            hidden, *_expand(final.args, index, size, memo), **_expand(final.kwargs, index, size, memo)
        )
        normed = normed[0] if isinstance(normed, tuple) else normed
        states = normed[torch.arange(len(index), device=normed.device), last]
        logits = _unembed(lm, states).float().cpu() if need_logits else None
    return logits, states.float().cpu()


def _check_replay(lm: LoadedModel, prefix: _Prefix) -> None:
    """Replay the recorded batch's last and first rows, swapped, from its first recorded layer: it must
    reproduce the model's own forward, else the model does something the replay misses."""
    size = int(prefix.batch.input_ids.shape[0])
    order = (
        torch.tensor([size - 1, 0]) if size > 1 else torch.tensor([0])
    )  # swapped rows: cheap, still a remap
    logits, hidden = _replay(lm, prefix, min(prefix.calls), order, Intervention(), need_logits=True)
    assert logits is not None
    pairs = (("logits", logits, prefix.logits[order]), ("hidden", hidden, prefix.hidden[order]))
    for name, mine, theirs in pairs:
        scale = 1.0 + float(theirs.abs().max())
        diff = float((mine - theirs).abs().max())
        if not diff <= REPLAY_TOLERANCE * scale:
            raise ScanError(
                f"fast scan cannot reproduce {type(lm.model).__name__}'s forward from its recorded layer "
                f"inputs ({name} differ by {diff:.3g}); use engine='simple' for this model"
            )


class _Prefixes:
    """Recorded prefixes of every prompt batch: kept when they fit `max_bytes`, else re-recorded for
    each block of candidates (one more plain forward per batch and block)."""

    def __init__(self, lm: LoadedModel, batches: list[_Batch], starts: set[int], max_bytes: int) -> None:
        self.lm = lm
        self.batches = batches
        self.starts = starts
        width = lm.info.hidden_size * 4
        estimate = sum(int(b.input_ids.numel()) * width * len(starts) for b in batches)
        self.keep = estimate <= max_bytes
        self._kept: dict[int, _Prefix] = {}
        self._checked = False

    def get(self, index: int, starts: set[int]) -> _Prefix:
        if index in self._kept:
            return self._kept[index]
        wanted = self.starts if self.keep else starts
        prefix = _record(self.lm, self.batches[index], wanted | {self.lm.info.n_layers})
        if not self._checked:
            _check_replay(self.lm, prefix)
            self._checked = True
        if self.keep:
            self._kept[index] = prefix
        return prefix


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
    lm: LoadedModel, prefix: _Prefix, chunk: Sequence[Intervention], start: int, readout: Readout
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
    logits, hidden = _replay(
        lm, prefix, start, index, _chunk_intervention(chunk, size), need_logits=readout.needs_logits
    )
    values = readout(LastPosition(logits, hidden if readout.needs_hidden else None, batch.rows[index]))
    yield from values.split(size)


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
) -> Tensor:
    """Readout of every prompt under every candidate: [n_candidates, n_prompts, …], like `scan`.

    A forward carries at most `max_rows` rows (candidates × prompts of one batch; at least one
    candidate). Recorded prefixes are kept for the whole scan while they fit `max_prefix_bytes`.
    Checkpoints use `scan`'s folder format (a scan can be resumed by either engine); results are
    written in blocks of ≥ `checkpoint_every` candidates, and on any exception.
    """
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    if len(encoded) == 0:
        raise ScanError("no prompts to scan")
    if not candidates:
        raise ScanError("no candidate interventions to scan")
    if batch_size < 1 or checkpoint_every < 1 or max_rows < 1:
        raise ScanError(
            f"batch_size, max_rows and checkpoint_every must be ≥ 1, got {batch_size}, {max_rows}, "
            f"{checkpoint_every}"
        )
    for i, candidate in enumerate(candidates):
        candidate.validate(lm.info)
        if any(edit.rows is not None for edit in candidate.edits):
            raise ScanError(f"candidate {i} already targets batch rows; the fast scan assigns rows itself")
    keys = [intervention_key(c) for c in candidates]
    store = _Checkpoint(Path(checkpoint), _manifest(lm, encoded, readout, keys)) if checkpoint else None
    results: dict[int, Tensor] = store.load() if store else {}
    batches = _batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
    starts = [start_layer(c, lm.info.n_layers) for c in candidates]
    todo = sorted((i for i in range(len(candidates)) if i not in results), key=lambda i: (starts[i], i))
    per_chunk = max(1, max_rows // batch_size)
    blocks = _blocks(todo, starts, per_chunk, checkpoint_every)
    prefixes = _Prefixes(lm, batches, {starts[i] for i in todo}, max_prefix_bytes) if todo else None
    bar = tqdm(total=len(candidates), initial=len(results), desc=desc, unit="cand", disable=not progress)
    pending: dict[int, Tensor] = {}
    try:
        for block in blocks:
            assert prefixes is not None
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
            for chunk in block:
                for index in chunk:
                    results[index] = pending[index] = values[index]
                    bar.update(1)
                    if on_candidate is not None:
                        on_candidate(index)
            if store:
                store.write(pending)
                pending = {}
    finally:
        bar.close()
        if store:
            store.write(pending)
    return torch.stack([results[i] for i in range(len(candidates))])


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
