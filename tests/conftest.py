from __future__ import annotations

import pytest
import torch

from finesteer.models import LoadedModel, load_model

FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3")
# Families added through adapters (issue 19): the invariant tests (test_interventions, test_families)
# run on all of them; the method tests keep the four above to bound CI time.
NEW_FAMILIES = (
    "tiny-gpt2",
    "tiny-phi3",
    "tiny-gemma2",
    "tiny-qwen3",
    "tiny-olmo2",
    "tiny-qwen2moe",
    "tiny-mixtral",
)
ALL_FAMILIES = FAMILIES + NEW_FAMILIES


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, LoadedModel]:
    return {name: load_model(name) for name in ALL_FAMILIES}


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
