"""Batched text generation with an optional intervention (left padding, greedy or seeded sampling)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel


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
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("sampling needs temperature > 0 (use do_sample=False for greedy)")


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
    context = intervene(lm, intervention) if intervention is not None else nullcontext()
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
        if config.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    batches = range(0, len(prompts), config.batch_size)
    with context:
        for start in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            chunk = list(prompts[start : start + config.batch_size])
            encoded = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=add_special_tokens,
            ).to(lm.device)
            if config.seed is not None:
                torch.manual_seed(config.seed + start)
            with torch.no_grad():
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
