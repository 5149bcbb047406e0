"""Seeded sampling uses a private RNG stream: same samples as before, the caller's RNG untouched."""

from __future__ import annotations

import pytest
import torch

import finesteer as fs
from finesteer.generation import GenerationConfig
from finesteer.models import LoadedModel, load_model

PROMPTS = ["hello there", "a longer prompt, padded less", "hi"]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-llama")


def _reference(lm: LoadedModel, config: GenerationConfig) -> list[str]:
    """What the former implementation did: re-seed the process RNG before each batch."""
    texts: list[str] = []
    for start in range(0, len(PROMPTS), config.batch_size):
        encoded = lm.tokenizer(
            PROMPTS[start : start + config.batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        torch.manual_seed(config.seed + start)  # type: ignore[operator]
        with torch.no_grad():
            out = lm.model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                pad_token_id=lm.tokenizer.pad_token_id,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
            )
        texts += lm.tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def test_seeded_sampling_is_unchanged_and_leaves_process_rng_alone(lm: LoadedModel) -> None:
    config = GenerationConfig(
        max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=7, batch_size=2
    )
    expected = _reference(lm, config)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    texts = fs.generate(lm, PROMPTS, config)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG was not re-seeded
    assert texts == expected
    assert fs.generate(lm, PROMPTS, config) == texts  # reproducible
    assert fs.generate(lm, PROMPTS, config, seed=8) != texts


def test_unseeded_sampling_draws_from_the_process_rng(lm: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, batch_size=3)
    torch.manual_seed(5)
    first = fs.generate(lm, PROMPTS, config)
    torch.manual_seed(5)
    assert fs.generate(lm, PROMPTS, config) == first
