"""Collect a site's per-token activations for a corpus into resumable shards on disk.

Collection is the expensive part of training an SAE on a CPU, so it is sharded (one safetensors file
per `shard_texts` texts, written atomically) and a rerun skips finished shards. The forward pass
stops right after the site's block (an exception raised from the hook), so a layer-12 SAE on a
30-layer model costs 13 layers per token, not 30.

Which tokens: every real token except the first `skip_first` of each text (position 0 of most chat
models is an attention-sink token with a norm ~100× the others, which would dominate MSE and the
learned features), and the token prefix shared by every text of the corpus (the default system
prompt of the chat template) is kept once instead of once per text. Every `heldout_every`-th text
goes to a held-out split, so explained variance is measured on texts the SAE never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations import pad
from finesteer.errors import FinesteerError
from finesteer.hooks import CallContext, HookSet
from finesteer.runs import write_json_atomic, write_safetensors_atomic
from finesteer.sites import Site

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

MANIFEST = "manifest.json"


class StoreError(FinesteerError, ValueError):
    """An activation store that does not match the request (other model, site or corpus)."""


class _StopForward(Exception):
    """Raised from the site hook: nothing after the site is needed."""


def common_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every sequence."""
    if not token_lists:
        return 0
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for tokens in token_lists[1:]:
        i = 0
        while i < n and tokens[i] == first[i]:
            i += 1
        n = i
    return n


def site_activations(
    lm: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    site: Site,
    starts: Sequence[int],
    *,
    batch_size: int = 16,
) -> list[Tensor]:
    """Activations [len - start, width] of each sequence at `site` from token `start` on (float32).

    Batches are right-padded (padding never precedes a real token, so positions are exact), and
    the forward stops after the site.
    """
    site.validate(lm.info)
    if site.is_head:
        raise StoreError("SAE collection reads residual-style sites, not per-head sites")
    pad_id = lm.tokenizer.pad_token_id
    out: list[Tensor | None] = [None] * len(token_lists)
    grabbed: dict[str, Tensor] = {}

    def grab(act: Tensor, ctx: CallContext) -> None:
        grabbed["act"] = act.detach().float().cpu()
        raise _StopForward

    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    with HookSet(lm.model, lm.adapter) as hooks:
        hooks.add(site, grab)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = pad([token_lists[i] for i in rows], "right", pad_id)
            try:
                with torch.no_grad():
                    lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise StoreError(f"the hook at {site} never ran; cannot collect activations")
            act = grabbed.pop("act")
            for r, i in enumerate(rows):
                out[i] = act[r, starts[i] : len(token_lists[i])]
    return [t for t in out if t is not None]


@dataclass(frozen=True)
class StoreSpec:
    """Identity of a store: a rerun with another spec is refused rather than mixing data."""

    model: str
    fingerprint: str
    hook_name: str
    n_texts: int
    corpus_digest: str
    shard_texts: int = 256
    heldout_every: int = 10
    skip_first: int = 1
    shared_prefix: int = 0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _digest(texts: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _shard(
    lm: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    site: Site,
    span: tuple[int, int],
    spec: StoreSpec,
    batch_size: int,
) -> dict[str, Tensor]:
    """Activations of texts lo..hi-1 at `site`, split into train and held-out (every
    `heldout_every`-th text) token rows."""
    lo, hi = span
    skip_first, shared, heldout_every = spec.skip_first, spec.shared_prefix, spec.heldout_every
    # The shared prefix is kept from text 0 only; every text drops its first `skip_first` tokens.
    starts = [max(skip_first, shared if i > 0 else 0) for i in range(lo, hi)]
    starts = [min(s, len(token_lists[i])) for s, i in zip(starts, range(lo, hi), strict=True)]
    acts = site_activations(lm, token_lists[lo:hi], site, starts, batch_size=batch_size)
    train = [a for a, i in zip(acts, range(lo, hi), strict=True) if i % heldout_every != heldout_every - 1]
    held = [a for a, i in zip(acts, range(lo, hi), strict=True) if i % heldout_every == heldout_every - 1]
    width = site.width(lm.info)
    return {
        "train": torch.cat(train) if train else torch.zeros(0, width),
        "heldout": torch.cat(held) if held else torch.zeros(0, width),
    }


def collect(
    lm: LoadedModel,
    texts: Sequence[str],
    site: Site,
    folder: str | Path,
    *,
    max_tokens: int | None = None,
    shard_texts: int = 256,
    heldout_every: int = 10,
    skip_first: int = 1,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Fill `folder` with shards of train / held-out activations; resumes where a previous run stopped.

    Stops after the shard where the train tokens reach `max_tokens` (None: the whole corpus).
    """
    if not texts:
        raise StoreError("no texts to collect activations from")
    if shard_texts < 1 or heldout_every < 2 or skip_first < 0:
        raise StoreError("need shard_texts ≥ 1, heldout_every ≥ 2 and skip_first ≥ 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token_lists = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = common_prefix_length(token_lists) if len(token_lists) > 1 else 0
    spec = StoreSpec(
        lm.name,
        lm.fingerprint,
        site.name,
        len(texts),
        _digest(texts),
        shard_texts,
        heldout_every,
        skip_first,
        shared,
    )
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["spec"] != spec.to_dict():
            raise StoreError(
                f"{folder} holds activations for another request ({manifest['spec']}); use a new folder"
            )
    else:
        manifest = {"spec": spec.to_dict(), "shards": []}
    done = {s["index"]: s for s in manifest["shards"]}
    train_tokens = sum(s["train_tokens"] for s in done.values())
    n_shards = (len(texts) + shard_texts - 1) // shard_texts
    bar = tqdm(total=max_tokens or None, desc=f"collect {site.name}", unit="tok", disable=not progress)
    bar.update(train_tokens)
    for index in range(n_shards):
        if max_tokens is not None and train_tokens >= max_tokens:
            break
        if index in done:
            continue
        lo, hi = index * shard_texts, min(len(texts), (index + 1) * shard_texts)
        tensors = _shard(lm, token_lists, site, (lo, hi), spec, batch_size)
        if not (torch.isfinite(tensors["train"]).all() and torch.isfinite(tensors["heldout"]).all()):
            raise StoreError(f"non-finite activations at {site} in texts {lo}..{hi - 1}")
        name = f"shard_{index:05d}.safetensors"
        write_safetensors_atomic(folder / name, tensors)
        entry = {"index": index, "file": name, "texts": [lo, hi], "train_tokens": len(tensors["train"]),
                 "heldout_tokens": len(tensors["heldout"])}  # fmt: skip
        manifest["shards"].append(entry)
        manifest["shards"].sort(key=lambda s: s["index"])
        write_json_atomic(manifest_path, manifest, indent=1)
        train_tokens += entry["train_tokens"]
        bar.update(entry["train_tokens"])
    bar.close()
    return folder


def load_split(folder: str | Path, split: str = "train") -> Tensor:
    """All collected activations of one split ("train" or "heldout"), [tokens, width]."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not an activation store")
    manifest = json.loads(manifest_path.read_text())
    parts = [load_file(str(folder / s["file"]))[split] for s in manifest["shards"]]
    if not parts or sum(len(p) for p in parts) == 0:
        raise StoreError(f"{folder} has no {split} activations")
    return torch.cat(parts)


def store_spec(folder: str | Path) -> dict[str, object]:
    return json.loads((Path(folder) / MANIFEST).read_text())["spec"]


def iter_batches(acts: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One shuffled pass over in-memory activations, in minibatches (last partial batch dropped)."""
    perm = torch.randperm(len(acts), generator=generator)
    for start in range(0, len(acts) - batch_size + 1, batch_size):
        yield acts[perm[start : start + batch_size]]


__all__ = [
    "StoreError",
    "StoreSpec",
    "collect",
    "common_prefix_length",
    "iter_batches",
    "load_split",
    "site_activations",
    "store_spec",
]
