"""Record what every decoder layer receives in one plain forward, and replay the layers from any of
them on chosen rows with an intervention applied: the prefix reuse of the fast scan.

A candidate whose first edit sits in layer l changes nothing before layer l. `record_prefix` runs one
plain forward of a prompt batch and records each layer's input (hidden state plus the mask / rotary /
position keyword arguments, through forward pre-hooks); `replay_layers` then calls the stock
decoder-layer modules l..L−1, the final norm and the unembedding directly on that recorded input,
expanded to the wanted rows. Nothing is forked: finesteer's site hooks sit on those modules and fire
as usual, with the per-call position context fed through the same `CallTracker` the base model's
pre-hook uses.

Per-layer keyword arguments are recorded per layer, so models whose layers get different masks or
rotary tables (Gemma 3 sliding/full attention) are handled. `RecordedPrefixes` replays two rows of
its first recorded batch, swapped, and checks they reproduce the model's own outputs
(`check_replay`), so a model whose forward does something the replay misses fails loudly (use
`engine="simple"`) instead of giving wrong scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from finesteer.hooks import HookSet
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.locate.engine import PromptBatch, ScanError, last_logits
from finesteer.models.loading import LoadedModel

REPLAY_TOLERANCE = 1e-4


@dataclass
class LayerCall:
    """What one module received in the recorded forward: its hidden-state input and the rest."""

    hidden: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class RecordedPrefix:
    """A prompt batch's recorded layer inputs (index n_layers = the final norm's input) and the base
    model's own last-position logits and final-norm states from that forward."""

    batch: PromptBatch
    calls: dict[int, LayerCall]
    logits: Tensor
    hidden: Tensor

    def nbytes(self) -> int:
        return sum(c.hidden.numel() * c.hidden.element_size() for c in self.calls.values())


def _split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> LayerCall:
    if args:
        return LayerCall(args[0], tuple(args[1:]), dict(kwargs))
    if "hidden_states" not in kwargs:
        raise ScanError("fast scan: a decoder layer was called without hidden_states; use engine='simple'")
    rest = dict(kwargs)
    return LayerCall(rest.pop("hidden_states"), (), rest)


def record_prefix(lm: LoadedModel, batch: PromptBatch, keep: set[int]) -> RecordedPrefix:
    """One plain forward of a batch (the call `scan` makes, so its outputs are bit-identical) recording
    every layer's inputs from the first layer in `keep` on, hidden states only for layers in `keep`."""
    n_layers = lm.info.n_layers
    layers = lm.adapter.layer_list(lm.model)
    norm = lm.adapter.get(lm.model, lm.adapter.final_norm)
    calls: dict[int, LayerCall] = {}
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
    with HookSet(lm.model, lm.adapter) as hooks, torch.no_grad():
        for offset, module in enumerate(modules):
            hooks.keep(module.register_forward_pre_hook(pre_hook(first + offset), with_kwargs=True))
        hooks.keep(norm.register_forward_hook(read_norm))
        logits = last_logits(lm, batch).detach().float().cpu()
    return RecordedPrefix(batch, calls, logits, captured["hidden"].float().cpu())


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


def unembed(lm: LoadedModel, hidden: Tensor) -> Tensor:
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


def replay_layers(
    lm: LoadedModel,
    prefix: RecordedPrefix,
    start: int,
    index: Tensor,
    intervention: Intervention,
    need_logits: bool,
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
        logits = unembed(lm, states).float().cpu() if need_logits else None
    return logits, states.float().cpu()


def _checkreplay_layers(lm: LoadedModel, prefix: RecordedPrefix) -> None:
    """Replay the recorded batch's last and first rows, swapped, from its first recorded layer: it must
    reproduce the model's own forward, else the model does something the replay misses."""
    size = int(prefix.batch.input_ids.shape[0])
    order = (
        torch.tensor([size - 1, 0]) if size > 1 else torch.tensor([0])
    )  # swapped rows: cheap, still a remap
    logits, hidden = replay_layers(lm, prefix, min(prefix.calls), order, Intervention(), need_logits=True)
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


class RecordedPrefixes:
    """Recorded prefixes of every prompt batch: kept when they fit `max_bytes`, else re-recorded for
    each block of candidates (one more plain forward per batch and block)."""

    def __init__(self, lm: LoadedModel, batches: list[PromptBatch], starts: set[int], max_bytes: int) -> None:
        self.lm = lm
        self.batches = batches
        self.starts = starts
        width = lm.info.hidden_size * 4
        estimate = sum(int(b.input_ids.numel()) * width * len(starts) for b in batches)
        self.keep = estimate <= max_bytes
        self._kept: dict[int, RecordedPrefix] = {}
        self._checked = False

    def get(self, index: int, starts: set[int]) -> RecordedPrefix:
        if index in self._kept:
            return self._kept[index]
        wanted = self.starts if self.keep else starts
        prefix = record_prefix(self.lm, self.batches[index], wanted | {self.lm.info.n_layers})
        if not self._checked:
            _checkreplay_layers(self.lm, prefix)
            self._checked = True
        if self.keep:
            self._kept[index] = prefix
        return prefix
