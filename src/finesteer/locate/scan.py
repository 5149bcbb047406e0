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
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.errors import FinesteerError
from finesteer.hooks import CallContext, HookSet
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.locate.scores import hash_prompts
from finesteer.models.loading import LoadedModel
from finesteer.runs import write_json_atomic, write_safetensors_atomic
from finesteer.sites import Site

log = logging.getLogger(__name__)

MANIFEST_FILE = "scan.json"
PART_PREFIX = "part-"
SCAN_FORMAT = "finesteer.scan_checkpoint"


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
    return EncodedPrompts(tuple(ids), hash_prompts(prompts))


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


@dataclass
class _Batch:
    rows: Tensor
    input_ids: Tensor
    mask: Tensor
    last: Tensor


def _batches(encoded: EncodedPrompts, batch_size: int, pad_id: int, device: torch.device) -> list[_Batch]:
    """Right-padded batches of prompts of similar length (sorted, so padding stays small)."""
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded.ids[i]), i))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded.ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(encoded.ids[r])] = torch.tensor(encoded.ids[r])
            mask[i, : len(encoded.ids[r])] = 1
        out.append(
            _Batch(torch.tensor(rows), input_ids.to(device), mask.to(device), (mask.sum(1) - 1).to(device))
        )
    return out


def _forward(lm: LoadedModel, batch: _Batch, readout: Readout) -> Tensor:
    """One forward; logits only at each row's last real position (not the whole vocab × sequence)."""
    captured: dict[str, Tensor] = {}
    batch_rows = torch.arange(batch.last.shape[0], device=batch.last.device)

    def read_hidden(act: Tensor, ctx: CallContext) -> None:
        captured["hidden"] = act[batch_rows, batch.last].detach()

    positions = torch.unique(batch.last)
    with HookSet(lm.model, lm.adapter) as hooks:
        if readout.needs_hidden:
            hooks.add(Site(lm.info.n_layers - 1, "ln_final"), read_hidden)
        with torch.no_grad():
            output = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.mask,
                use_cache=False,
                logits_to_keep=positions if readout.needs_logits else 1,
            )
    logits = None
    if readout.needs_logits:
        column = torch.searchsorted(positions, batch.last)
        logits = output.logits[batch_rows, column].detach().float().cpu()
    hidden = captured["hidden"].float().cpu() if readout.needs_hidden else None
    return readout(LastPosition(logits, hidden, batch.rows))


def _manifest(
    lm: LoadedModel, encoded: EncodedPrompts, readout: Readout, keys: Sequence[str]
) -> dict[str, Any]:
    return {
        "format": SCAN_FORMAT,
        "model_name": lm.name,
        "model_fingerprint": lm.fingerprint,
        "model_info": lm.info.to_dict(),
        "prompts_hash": encoded.texts_hash,
        "n_prompts": len(encoded),
        "readout": readout.key(),
        "n_candidates": len(keys),
        "candidates_hash": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
    }


class _Checkpoint:
    """Finished candidates in `part-*.safetensors` files next to a manifest naming the scan."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST_FILE
        if path.is_file():
            found = json.loads(path.read_text())
            diff = sorted(k for k in manifest if found.get(k) != manifest[k])
            if diff:
                raise ScanError(
                    f"checkpoint {folder} belongs to a different scan (differs in {', '.join(diff)}); "
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
    encoded = prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(lm, prompts)
    if len(encoded) == 0:
        raise ScanError("no prompts to scan")
    if not candidates:
        raise ScanError("no candidate interventions to scan")
    if batch_size < 1 or checkpoint_every < 1:
        raise ScanError(f"batch_size and checkpoint_every must be ≥ 1, got {batch_size}, {checkpoint_every}")
    for candidate in candidates:
        candidate.validate(lm.info)
    keys = [c.digest() for c in candidates]
    store = _Checkpoint(Path(checkpoint), _manifest(lm, encoded, readout, keys)) if checkpoint else None
    results: dict[int, Tensor] = store.load() if store else {}
    pending: dict[int, Tensor] = {}
    batches = _batches(encoded, batch_size, lm.tokenizer.pad_token_id, lm.device)
    todo = [i for i in range(len(candidates)) if i not in results]
    bar = tqdm(total=len(candidates), initial=len(results), desc=desc, unit="cand", disable=not progress)
    try:
        for index in todo:
            values: Tensor | None = None
            with intervene(lm, candidates[index]):
                for batch in batches:
                    part = _forward(lm, batch, readout)
                    if values is None:
                        values = torch.empty((len(encoded), *part.shape[1:]), dtype=part.dtype)
                    values[batch.rows] = part
            assert values is not None
            results[index] = values
            pending[index] = values
            bar.update(1)
            if store and len(pending) >= checkpoint_every:
                store.write(pending)
                pending = {}
            if on_candidate is not None:
                on_candidate(index)
    finally:
        bar.close()
        if store:
            store.write(pending)
    return torch.stack([results[i] for i in range(len(candidates))])
