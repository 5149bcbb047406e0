"""The fine-tuning baseline: supervised LoRA on the same contrastive A/B data, then merged.

Training pairs are (A/B prompt pre-filled with "(", behaviour-matching answer): by default the
answer letter, ")" and the option's text ("A) Yes, I would …"), so the model learns both to pick
the letter and to say the answer. The loss covers the answer tokens only. The scored token
sequence is the one `finesteer.scoring.ab` scores (for tokenizers that merge "(A" the answer starts
at that merged token).

The original model is never touched: the LoRA model wraps a deep copy, and the merged copy is
returned as a new `LoadedModel` (name `<model>+lora`, fingerprint extended with the adapter's hash).
CPU, float32, seeded; a few hundred steps at most.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from finesteer.activations.padding import pad
from finesteer.data.items import ABItem, option_text
from finesteer.errors import FinesteerError
from finesteer.models.loading import wrap_model
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, item_target

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

log = logging.getLogger(__name__)

Completion = Literal["letter", "answer"]


class LoRAError(FinesteerError, ValueError):
    """Training that cannot run or diverged (no items, bad settings, NaN loss)."""


@dataclass(frozen=True)
class LoRASettings:
    """Hyper-parameters. `target_modules="all-linear"` adapts every linear layer except the head."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    learning_rate: float = 3e-4
    max_steps: int = 100
    batch_size: int = 8
    warmup_steps: int = 5
    weight_decay: float = 0.0
    completion: Completion = "answer"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"rank must be ≥ 1, got {self.rank}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise LoRAError(f"max_steps and batch_size must be ≥ 1, got {self.max_steps}, {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise LoRAError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_steps < 0:
            raise LoRAError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.completion not in ("letter", "answer"):
            raise LoRAError(f"completion must be 'letter' or 'answer', got {self.completion!r}")


@dataclass
class FineTuned:
    """The merged fine-tuned copy, and what training did (loss curve, time, settings)."""

    lm: LoadedModel
    metadata: dict[str, Any] = field(default_factory=dict)


def training_sequences(
    tokenizer: Any,
    items: Sequence[ABItem],
    *,
    completion: Completion = "answer",
    prompt: ABPrompt = DEFAULT_PROMPT,
) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token) for each item's behaviour-matching answer."""
    if not items:
        raise LoRAError("no training items for LoRA")
    sequences = []
    for item in items:
        text = prompt.text(tokenizer, item)
        target = item_target(tokenizer, item, prompt)
        letter = item.matching_letter
        answer = f"{letter})"
        if completion == "answer" and option_text(item.question, letter):
            answer += " " + option_text(item.question, letter)
        ids = list(tokenizer(text + answer, add_special_tokens=False)["input_ids"])
        start = len(target.tokens)
        if ids[:start] != list(target.tokens) or ids[start] != target.letter_ids[letter]:
            raise LoRAError(
                f"item {item.id!r}: prompt + answer does not tokenize as the scored prompt followed by the "
                "answer letter; cannot place the loss on the answer"
            )
        eos = tokenizer.eos_token_id
        sequences.append((ids + ([eos] if eos is not None else []), start))
    return sequences


def _batch(chunk: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, mask = pad([ids for ids, _ in chunk], "right", pad_id)
    labels = torch.full(input_ids.shape, -100, dtype=torch.long)
    for row, (ids, start) in enumerate(chunk):
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _adapter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cuda_devices(device: Any) -> list[torch.device]:
    """The CUDA device whose RNG a fit draws from (none on CPU), for `torch.random.fork_rng`."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else []


def _lora_config(settings: LoRASettings, config_class: Any) -> Any:
    target: Any = (
        settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    )
    return config_class(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _train(
    peft_model: Any,
    trainable: list[torch.nn.Parameter],
    sequences: Sequence[tuple[list[int], int]],
    settings: LoRASettings,
    pad_id: int,
    device: Any,
    progress: bool,
) -> list[float]:
    """AdamW with linear warm-up on the answer tokens; batches follow a seeded permutation. The loss curve."""
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order_gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    peft_model.train()
    for step in tqdm(range(settings.max_steps), desc="LoRA", disable=not progress, unit="step"):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(sequences), generator=order_gen).tolist()
        picked, order = order[: settings.batch_size], order[settings.batch_size :]
        batch = {k: v.to(device) for k, v in _batch([sequences[i] for i in picked], pad_id).items()}
        loss = peft_model(**batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise LoRAError(f"LoRA loss became {float(loss)} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(round(float(loss.detach()), 5))
    return losses


def fit_lora(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    settings: LoRASettings | None = None,
    *,
    prompt: ABPrompt = DEFAULT_PROMPT,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> FineTuned:
    """Fine-tune a LoRA on the behaviour-matching answers of `train_items` and merge it into a copy.

    With `run_dir`, the adapter is saved there (`lora_adapter/`, peft's `save_pretrained`) with the
    loss curve (`lora_loss.json`).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # optional dependency
        raise LoRAError("the LoRA baseline needs peft: pip install 'finesteer[lora]'") from exc

    settings = settings or LoRASettings()
    sequences = training_sequences(lm.tokenizer, train_items, completion=settings.completion, prompt=prompt)
    started = time.perf_counter()
    # The seed drives the LoRA initialisation (peft draws from torch's default generator) and dropout;
    # fork_rng confines it, so fitting never re-seeds the caller's process-wide RNG.
    with torch.random.fork_rng(devices=_cuda_devices(lm.device)):
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(copy.deepcopy(lm.model), _lora_config(settings, LoraConfig))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        losses = _train(
            peft_model, trainable, sequences, settings, lm.tokenizer.pad_token_id, lm.device, progress
        )
    peft_model.eval()
    digest = _adapter_digest(peft_model)
    seconds = time.perf_counter() - started
    if run_dir is not None:
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(folder / "lora_adapter"))
        (folder / "lora_loss.json").write_text(json.dumps({"loss": losses}, indent=1) + "\n")
    merged = peft_model.merge_and_unload()
    merged.eval()
    for param in merged.parameters():
        param.requires_grad_(False)
    tuned = wrap_model(
        merged, lm.tokenizer, name=f"{lm.name}+lora", fingerprint=f"{lm.fingerprint}+lora:{digest}"
    )
    window = max(1, min(10, len(losses) // 4))
    metadata = {
        "method": "lora",
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "n_train": len(sequences),
        "epochs": round(settings.max_steps * settings.batch_size / len(sequences), 2),
        "trainable_parameters": n_trainable,
        "train_seconds": round(seconds, 2),
        "loss_curve": losses,
        "loss_start": float(sum(losses[:window]) / window),
        "loss_end": float(sum(losses[-window:]) / window),
        "adapter_digest": digest,
        "system_prompt": prompt.system,
    }
    log.info(
        "LoRA: %d steps in %.0fs, loss %.3f → %.3f",
        settings.max_steps,
        seconds,
        metadata["loss_start"],
        metadata["loss_end"],
    )
    return FineTuned(tuned, metadata)


__all__ = [
    "Completion",
    "FineTuned",
    "LoRAError",
    "LoRASettings",
    "fit_lora",
    "option_text",
    "training_sequences",
]
