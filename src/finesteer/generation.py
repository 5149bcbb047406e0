"""Batched text generation with an optional intervention (left padding, greedy or seeded sampling).

`generate_batches` is a generator, so it may be paused between batches (or abandoned). Its
intervention is therefore registered only around each batch's own `generate` call: while it is
paused, no hook of it is on the model, and any other caller's forward is unsteered.

A seeded run samples from a private RNG stream: the process RNG is forked around each batch (and
restored after), so seeding a generation never re-seeds the caller's torch RNG. HF's sampling draws
from the global RNG and takes no `torch.Generator`, hence the fork rather than a generator object.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from finesteer.errors import FinesteerError
from finesteer.interventions.apply import intervene, resolve
from finesteer.interventions.edit import Intervention
from finesteer.models.context import check_prompt_lengths
from finesteer.models.loading import LoadedModel


class GenerationError(FinesteerError, ValueError):
    """Generation settings that cannot work (no tokens, no batch, sampling at temperature 0)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; greedy by default so runs are reproducible."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be an integer ≥ 1, got {value!r}")
        if self.do_sample and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise GenerationError("sampling needs a finite temperature > 0 (use do_sample=False for greedy)")


@contextmanager
def _seeded(lm: LoadedModel, seed: int | None) -> Iterator[None]:
    """Sample from a private RNG stream seeded with `seed`, leaving the process RNG untouched."""
    if seed is None:
        yield
        return
    device = lm.device
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def generate_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    config: GenerationConfig = GenerationConfig(),
    *,
    intervention: Intervention | None = None,
    add_special_tokens: bool = False,
    progress: bool = False,
) -> Iterator[list[str]]:
    """Yield the completions batch by batch (so callers can stream them to disk)."""
    tokenizer = lm.tokenizer
    if intervention is not None:
        intervention = resolve(lm, intervention)
        intervention.validate(lm.info)  # fail on the first `next`, before any tokenising
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
        if config.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    batches = range(0, len(prompts), config.batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        chunk = list(prompts[start : start + config.batch_size])
        encoded = tokenizer(
            chunk,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=add_special_tokens,
        ).to(lm.device)
        lengths = encoded["attention_mask"].sum(1).tolist()
        check_prompt_lengths(lm, lengths, extra=config.max_new_tokens)
        steering = intervene(lm, intervention) if intervention is not None else nullcontext()
        seed = None if config.seed is None else config.seed + start
        with steering, _seeded(lm, seed), torch.no_grad():
            output = lm.model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        yield tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def generate(
    lm: LoadedModel,
    prompts: Sequence[str] | str,
    config: GenerationConfig | None = None,
    *,
    intervention: Intervention | None = None,
    add_special_tokens: bool = False,
    progress: bool = False,
    **overrides: object,
) -> list[str]:
    """Generate completions for fully formatted prompts; keyword overrides patch the config."""
    if isinstance(prompts, str):
        prompts = [prompts]
    config = GenerationConfig(**{**(config.__dict__ if config else {}), **overrides})  # type: ignore[arg-type]
    texts: list[str] = []
    for batch in generate_batches(
        lm,
        prompts,
        config,
        intervention=intervention,
        add_special_tokens=add_special_tokens,
        progress=progress,
    ):
        texts.extend(batch)
    return texts
