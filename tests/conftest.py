from __future__ import annotations

import pytest
import torch

from finesteer.models import LoadedModel, load_model

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    return {name: load_model(name) for name in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models[request.param]


def chat(lm: LoadedModel, text: str) -> str:
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture
def prompts(tiny: LoadedModel) -> list[str]:
    return [chat(tiny, t) for t in ("hello there", "a much longer prompt, padded less", "hi")]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
