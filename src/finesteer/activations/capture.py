"""Read activations at many sites for many prompts in batches, at chosen token positions.

Batches are right-padded, so every real token keeps its unpadded position and a batched capture
equals capturing each prompt alone. Inputs are either full texts or (prompt, completion) pairs; pairs
are tokenised separately and joined so the answer span is exact (for 'answer_mean').
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations.padding import pad
from finesteer.errors import FinesteerError
from finesteer.hooks import CallContext, HookSet
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.models.context import check_prompt_lengths
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

Position = str | int
TextInput = str | tuple[str, str]


class CaptureError(FinesteerError, ValueError):
    """Bad capture request (position outside a prompt, no answer span, empty input)."""


@dataclass
class Activations:
    """Captured activations: `tensors[site_name]` is [N, width] ([N, heads, head_dim] for a whole
    layer of heads), or [N, S, …] padded with `lengths` when position='all'. Row i is `ids[i]`."""

    tensors: dict[str, Tensor]
    ids: list[str]
    position: str
    lengths: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, site: Site | str) -> Tensor:
        key = site.name if isinstance(site, Site) else site
        if key not in self.tensors:
            raise KeyError(f"site {key} was not captured; captured: {', '.join(self.tensors)}")
        return self.tensors[key]

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        if self.lengths is not None:
            tensors["__lengths__"] = self.lengths
        header = {"ids": self.ids, "position": self.position, "meta": self.meta}
        save_file(tensors, str(path), metadata={"finesteer": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("finesteer", "{}"))
        if not header:
            raise CaptureError(f"{path} is not a finesteer activation file (no 'finesteer' metadata)")
        tensors = load_file(str(path))
        lengths = tensors.pop("__lengths__", None)
        return cls(tensors, header["ids"], header["position"], lengths, header.get("meta", {}))


def to_tokens(
    tokenizer: Any, text: str, *, prepend_bos: bool = False, add_special_tokens: bool = False
) -> list[int]:
    """Token ids of `text`, optionally with the tokenizer's BOS token in front.

    `prepend_bos=True` matches TransformerLens's default (`HookedTransformer.to_tokens`, whose
    `prepend_bos` defaults to True): one BOS id first, whatever the tokenizer would add by itself
    (never two). finesteer's default is False because its prompts come fully formatted (a chat
    template already starts with the model's BOS where it wants one). Activations differ with and
    without it, so set it alike when comparing with TL.
    """
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if not prepend_bos:
        return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise CaptureError("prepend_bos=True but the tokenizer has no BOS token")
    return ids if ids[:1] == [bos] else [bos, *ids]


def _tokenize(
    tokenizer: Any, item: TextInput, add_special_tokens: bool, prepend_bos: bool
) -> tuple[list[int], int]:
    """Token ids of the input and the index where the answer starts (len for a plain text)."""
    options = {"add_special_tokens": add_special_tokens, "prepend_bos": prepend_bos}
    if isinstance(item, str):
        ids = to_tokens(tokenizer, item, **options)
        return ids, len(ids)
    prompt, completion = item
    prompt_ids = to_tokens(tokenizer, prompt, **options)
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise CaptureError(f"empty completion for prompt {prompt[:60]!r}")
    return prompt_ids + answer_ids, len(prompt_ids)


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Run with eager attention (the implementation that returns attention weights), then restore."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _select(act: Tensor, lengths: Tensor, starts: Tensor, position: Position) -> Tensor:
    """Pick the captured position(s) from a right-padded [B, S, W] batch."""
    if position == "all":
        return act
    device = act.device  # a GPU, or another GPU than the embeddings' under a device map
    rows = torch.arange(act.shape[0], device=device)
    lengths, starts = lengths.to(device), starts.to(device)
    if position == "last":
        return act[rows, lengths - 1]
    if position == "answer_mean":
        index = torch.arange(act.shape[1], device=device)[None, :]
        weights = ((index >= starts[:, None]) & (index < lengths[:, None])).to(act.dtype)
        return (act * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    if isinstance(position, int):
        idx = lengths + position if position < 0 else torch.full_like(lengths, position)
        if bool(((idx < 0) | (idx >= lengths)).any()):
            raise CaptureError(f"position {position} is outside a prompt of {int(lengths.min())} tokens")
        return act[rows, idx]
    raise CaptureError(f"unknown position {position!r}: use 'last', 'answer_mean', 'all' or an int index")


def capture(
    lm: LoadedModel,
    inputs: Sequence[TextInput],
    sites: Iterable[Site | str],
    *,
    position: Position = "last",
    batch_size: int = 8,
    intervention: Intervention | None = None,
    add_special_tokens: bool = False,
    prepend_bos: bool = False,
    ids: Sequence[str] | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Activations:
    """Run the model over `inputs` and keep the activations at `sites` for the chosen positions.

    Prompts are expected fully formatted (chat template applied), hence no special tokens added by
    default; `prepend_bos=True` puts one BOS first as TransformerLens does by default (`to_tokens`).
    With `intervention` the activations are those of the intervened model. Head sites come as
    [..., heads, head_dim] (key/value heads for hook_k / hook_v); `hook_pattern` as
    [..., heads, key position], its key axis zero-padded to the longest input; for it the model runs
    with eager attention during the capture (other implementations return no attention weights).
    """
    if not inputs:
        raise CaptureError("no inputs to capture")
    if position == "answer_mean" and all(isinstance(i, str) for i in inputs):
        raise CaptureError("position='answer_mean' needs (prompt, completion) pairs to know the answer span")
    info = lm.info
    site_list = [Site.parse(s, info.n_layers) if isinstance(s, str) else s for s in sites]
    for site in site_list:
        site.validate(info)
    pad_id = lm.tokenizer.pad_token_id
    encoded = [_tokenize(lm.tokenizer, item, add_special_tokens, prepend_bos) for item in inputs]
    check_prompt_lengths(lm, [len(tokens) for tokens, _ in encoded], what="input")
    collected: dict[str, list[Tensor]] = {s.name: [] for s in site_list}
    all_lengths: list[Tensor] = []
    batch_state: dict[str, Tensor] = {}

    def reader(site: Site):
        def read(act: Tensor, ctx: CallContext) -> None:
            value = _select(act.detach().to(dtype), batch_state["lengths"], batch_state["starts"], position)
            if site.is_head:
                value = value.reshape(*value.shape[:-1], site.head_count(info), -1)
                if site.head is not None:
                    value = value[..., site.head, :]
            collected[site.name].append(value.cpu())
            return None

        return read

    with ExitStack() as stack:
        if any(site.component == "pattern" for site in site_list):
            stack.enter_context(_eager_attention(lm.model))
        if intervention is not None:
            stack.enter_context(intervene(lm, intervention))
        hooks = stack.enter_context(HookSet(lm.model, lm.adapter, info))
        for site in site_list:
            hooks.add(Site(site.layer, site.component), reader(site))
        batches = range(0, len(encoded), batch_size)
        for start in tqdm(batches, desc="capture", disable=not progress, unit="batch"):
            chunk = encoded[start : start + batch_size]
            input_ids, mask = pad([tokens for tokens, _ in chunk], "right", pad_id)
            batch_state["lengths"] = mask.sum(1)
            batch_state["starts"] = torch.tensor([s for _, s in chunk])
            all_lengths.append(batch_state["lengths"])
            with torch.no_grad():
                lm.model(
                    input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False
                )

    lengths = torch.cat(all_lengths)
    tensors = {}
    for name, parts in collected.items():
        if name.split("[")[0].endswith("hook_pattern"):  # key axis: as long as the batch's prompts
            keys = max(p.shape[-1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, keys - p.shape[-1])) for p in parts]
        if position == "all":
            longest = int(lengths.max())
            parts = [
                torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, longest - p.shape[1])) for p in parts
            ]
        tensors[name] = torch.cat(parts)
    row_ids = list(ids) if ids is not None else [str(i) for i in range(len(inputs))]
    return Activations(tensors, row_ids, str(position), lengths if position == "all" else None)
