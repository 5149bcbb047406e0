"""What every scan engine shares: encoded prompts and their batches, the readout interface, the
checkpoint folder, and the driver loop of `ScanEngine.run`.

A scan computes a readout of every prompt under every candidate intervention, [candidates, prompts, …].
Engines differ only in how they run the model (`finesteer.locate.scan.SimpleScan`: one hooked forward
per candidate; `finesteer.locate.fast_scan.FastScan`: candidates batched into rows, unchanged layers
reused). They implement `ScanEngine.blocks`; `ScanEngine.run` does the rest the same way for all of
them: argument checks, the checkpoint folder (finished candidates are written there, and a rerun with
the same folder skips them, whichever engine wrote them), progress and the `on_candidate` callback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, overload

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations.padding import pad
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Intervention
from finesteer.locate.scores import hash_prompts
from finesteer.models.context import check_prompt_lengths
from finesteer.models.loading import LoadedModel
from finesteer.runs import write_json_atomic, write_safetensors_atomic
from finesteer.runs.lock import FolderLock
from finesteer.runs.manifest import differences

log = logging.getLogger(__name__)

MANIFEST_FILE = "scan.json"
PART_PREFIX = "part-"
SCAN_FORMAT = "finesteer.scan_checkpoint"
SCAN_FORMAT_VERSION = 2
"""2: candidates keyed by `Intervention.digest()` (1, before 0.2, keyed them by another hash)."""


class ScanError(FinesteerError, ValueError):
    """A scan that cannot run: no prompts or candidates, or a checkpoint from a different scan."""


@dataclass(frozen=True)
class EncodedPrompts:
    """Token ids of fully formatted prompts, plus a hash of the texts for provenance/checkpoints."""

    ids: tuple[tuple[int, ...], ...]
    texts_hash: str

    def __len__(self) -> int:
        return len(self.ids)


def encode_prompts(
    lm: LoadedModel, prompts: Sequence[str], *, add_special_tokens: bool = False
) -> EncodedPrompts:
    """Tokenise formatted prompts once (chat templates write their own BOS, hence no special tokens)."""
    if isinstance(prompts, str):
        raise ScanError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ScanError("no prompts to scan")
    ids = []
    for i, text in enumerate(prompts):
        tokens = lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not tokens:
            raise ScanError(f"prompt {i} is empty after tokenisation")
        ids.append(tuple(int(t) for t in tokens))
    check_prompt_lengths(lm, [len(t) for t in ids])
    return EncodedPrompts(tuple(ids), hash_prompts(prompts))


def as_encoded(lm: LoadedModel, prompts: EncodedPrompts | Sequence[str]) -> EncodedPrompts:
    """`prompts` as they are when already encoded, else `encode_prompts(lm, prompts)`."""
    return prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)


@dataclass
class PromptBatch:
    """Right-padded prompts of one forward: their prompt indices, ids, mask and last real position."""

    rows: Tensor
    input_ids: Tensor
    mask: Tensor
    last: Tensor


@overload
def last_logits(lm: LoadedModel, batch: PromptBatch) -> Tensor: ...
@overload
def last_logits(lm: LoadedModel, batch: PromptBatch, *, logits: bool) -> Tensor | None: ...
def last_logits(lm: LoadedModel, batch: PromptBatch, *, logits: bool = True) -> Tensor | None:
    """One forward of `batch`: the logits at each row's last real position [B, vocab] (the vocabulary
    is projected only there), or None with `logits=False` (hooks then read what they need)."""
    positions = torch.unique(batch.last)
    output = lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.mask,
        use_cache=False,
        logits_to_keep=positions if logits else 1,
    )
    if not logits:
        return None
    column = torch.searchsorted(positions, batch.last)
    rows = torch.arange(batch.last.shape[0], device=batch.last.device)
    return output.logits[rows, column]


def prompt_batches(
    encoded: EncodedPrompts, batch_size: int, pad_id: int, device: torch.device
) -> list[PromptBatch]:
    """Right-padded batches of prompts of similar length (sorted, so padding stays small)."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded.ids[i]), i))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad([encoded.ids[r] for r in rows], "right", pad_id)
        out.append(
            PromptBatch(
                torch.tensor(rows), input_ids.to(device), mask.to(device), (mask.sum(1) - 1).to(device)
            )
        )
    return out


@dataclass(frozen=True)
class LastPosition:
    """What one forward leaves for a readout: the last real token's logits and final hidden state.

    `hidden` is the final-norm output (HF `hidden_states[-1]`, TL `ln_final.hook_normalized`), the
    state the Ships/Sahara code stacks; `rows` are the prompt indices of the batch rows.
    """

    logits: Tensor | None
    hidden: Tensor | None
    rows: Tensor


class Readout(ABC):
    """Turns a batch's last-position outputs into the per-prompt values a scan keeps."""

    needs_logits: bool = False
    needs_hidden: bool = False

    @abstractmethod
    def __call__(self, out: LastPosition) -> Tensor:
        """[batch, …] values for the rows of this batch (float32 or float64, on CPU)."""

    @abstractmethod
    def key(self) -> str:
        """Identifies the readout (and any reference it compares against) in a checkpoint."""


def scan_manifest(
    lm: LoadedModel, encoded: EncodedPrompts, readout: Readout, keys: Sequence[str]
) -> dict[str, Any]:
    """What names a scan in its checkpoint folder: model, prompts, readout and candidate keys."""
    return {
        "format": SCAN_FORMAT,
        "format_version": SCAN_FORMAT_VERSION,
        "model_name": lm.name,
        "model_fingerprint": lm.fingerprint,
        "model_info": lm.info.to_dict(),
        "prompts_hash": encoded.texts_hash,
        "n_prompts": len(encoded),
        "readout": readout.key(),
        "n_candidates": len(keys),
        "candidates_hash": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
    }


class ScanCheckpoint:
    """Finished candidates in `part-*.safetensors` files next to a manifest naming the scan."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST_FILE
        if path.is_file():
            found = json.loads(path.read_text())
            version = found.get("format_version", 1)
            if version != SCAN_FORMAT_VERSION:
                raise ScanError(
                    f"checkpoint {folder} was written by another finesteer version (scan checkpoint "
                    f"format {version}, this version reads {SCAN_FORMAT_VERSION}) and cannot be resumed; "
                    "delete it or use another folder"
                )
            diff = differences(found, manifest)
            if diff:
                raise ScanError(
                    f"checkpoint {folder} belongs to a different scan ({'; '.join(diff)}); "
                    "use another folder or delete it"
                )
        else:
            write_json_atomic(path, manifest, indent=1)
        self._next_part = 0

    def load(self) -> dict[int, Tensor]:
        done: dict[int, Tensor] = {}
        parts = sorted(self.folder.glob(f"{PART_PREFIX}*.safetensors"))
        for part in parts:
            tensors = load_file(str(part))
            for index, value in zip(tensors["index"].tolist(), tensors["values"], strict=True):
                done[int(index)] = value
        self._next_part = len(parts)
        if done:
            log.info("resuming from %s: %d candidates already done, not recomputed", self.folder, len(done))
        return done

    def write(self, finished: dict[int, Tensor]) -> None:
        if not finished:
            return
        indices = sorted(finished)
        tensors = {
            "index": torch.tensor(indices, dtype=torch.long),
            "values": torch.stack([finished[i] for i in indices]).contiguous(),
        }
        name = f"{PART_PREFIX}{self._next_part:06d}.safetensors"
        write_safetensors_atomic(self.folder / name, tensors)
        self._next_part += 1


class ScanEngine(ABC):
    """One way of running the model for a scan; `run` is the scan itself, the same for every engine."""

    name: ClassVar[str]
    desc: ClassVar[str] = "scan"

    @abstractmethod
    def check(
        self, lm: LoadedModel, candidates: Sequence[Intervention], batch_size: int, checkpoint_every: int
    ) -> None:
        """Raise `ScanError` (or the intervention's own error) for arguments this engine cannot run."""

    @abstractmethod
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
        """Compute the candidates `todo` (indices into `candidates`), yielding finished blocks
        {index: [n_prompts, …] readout values}, in the order they should be reported."""

    def run(
        self,
        lm: LoadedModel,
        prompts: EncodedPrompts | Sequence[str],
        candidates: Sequence[Intervention],
        readout: Readout,
        *,
        batch_size: int = 8,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 8,
        progress: bool = True,
        desc: str | None = None,
        on_candidate: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Readout of every prompt under every candidate: [n_candidates, n_prompts, …].

        With `checkpoint` (a folder), finished candidates are written once ≥ `checkpoint_every`
        are unsaved (and on any exception), and a rerun with the same folder, model, prompts,
        readout and candidates loads them instead of recomputing. `on_candidate` is called with each
        newly finished candidate's index (progress reporting, tests).
        """
        encoded = as_encoded(lm, prompts)
        if len(encoded) == 0:
            raise ScanError("no prompts to scan")
        if not candidates:
            raise ScanError("no candidate interventions to scan")
        self.check(lm, candidates, batch_size, checkpoint_every)
        keys = [c.digest() for c in candidates]
        lock = FolderLock(Path(checkpoint)) if checkpoint else nullcontext()
        with lock:  # a second process scanning into the same folder is refused at once
            return self._run(
                lm,
                encoded,
                candidates,
                readout,
                keys,
                batch_size,
                checkpoint,
                checkpoint_every,
                progress,
                desc,
                on_candidate,
            )

    def _run(
        self,
        lm: LoadedModel,
        encoded: EncodedPrompts,
        candidates: Sequence[Intervention],
        readout: Readout,
        keys: list[str],
        batch_size: int,
        checkpoint: str | Path | None,
        checkpoint_every: int,
        progress: bool,
        desc: str | None,
        on_candidate: Callable[[int], None] | None,
    ) -> Tensor:
        store = (
            ScanCheckpoint(Path(checkpoint), scan_manifest(lm, encoded, readout, keys))
            if checkpoint
            else None
        )
        results: dict[int, Tensor] = store.load() if store else {}
        todo = [i for i in range(len(candidates)) if i not in results]
        bar = tqdm(
            total=len(candidates),
            initial=len(results),
            desc=self.desc if desc is None else desc,
            unit="cand",
            disable=not progress,
        )
        pending: dict[int, Tensor] = {}
        try:
            for block in self.blocks(lm, encoded, candidates, todo, readout, batch_size, checkpoint_every):
                for index, values in block.items():
                    results[index] = pending[index] = values
                    bar.update(1)
                    if on_candidate is not None:
                        on_candidate(index)
                if store and len(pending) >= checkpoint_every:
                    store.write(pending)
                    pending = {}
        finally:
            bar.close()
            if store:
                store.write(pending)
        return torch.stack([results[i] for i in range(len(candidates))])
