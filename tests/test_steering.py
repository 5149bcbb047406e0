"""`Steering`: the one fitted-steering type (scaled, key, apply, save/load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer.fit.steering import Steering, SteeringError
from finesteer.models import LoadedModel


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


def _logits(lm: LoadedModel) -> torch.Tensor:
    ids = lm.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def test_scaled_key_apply_and_save_round_trip(llama: LoadedModel, tmp_path: Path) -> None:
    vector = torch.randn(llama.info.hidden_size, generator=torch.Generator().manual_seed(0))
    steering = Steering("v", fs.steer_residual(1, vector, 1.0), {"multiplier": 1.0}, lm=llama)
    double = steering.scaled(2.0, name="v@2")
    assert double.name == "v@2" and double.metadata["multiplier"] == 2.0
    assert double.intervention is not None and double.intervention.edits[0].op.scale == 2.0
    assert steering.key() == Steering("w", steering.intervention, lm=llama).key()  # name is not identity
    assert steering.key() != double.key() and len(steering.key()) == 16
    assert steering.identity() == {
        "model": llama.name,
        "fingerprint": llama.fingerprint,
        "intervention": steering.identity()["intervention"],
        "system_prompt": None,
    }

    plain = _logits(llama)
    with steering.apply() as model:
        assert model is llama
        steered = _logits(llama)
    assert not torch.allclose(plain, steered) and torch.equal(_logits(llama), plain)  # hooks removed
    with pytest.raises(RuntimeError), steering.apply():
        raise RuntimeError("boom")
    assert torch.equal(_logits(llama), plain)

    folder = double.save(tmp_path / "art")
    assert fs.load_intervention(folder).metadata["method"] == "v@2"  # a plain intervention artifact
    again = Steering.load(folder, llama)
    assert again.name == "v@2" and again.key() == double.key() and again == double
    with again.apply():
        loaded = _logits(llama)
    with double.apply():
        fitted = _logits(llama)
    assert torch.equal(loaded, fitted) and not torch.allclose(loaded, steered)


def test_prompt_only_steering(llama: LoadedModel, tmp_path: Path) -> None:
    prompt = Steering("prompt", metadata={"method": "prompt"}, system_prompt="Be brief.")
    with pytest.raises(SteeringError, match="bound to no model"):
        prompt.key()
    with pytest.raises(SteeringError, match="no intervention"):
        prompt.scaled(2.0)
    with prompt.apply(llama) as model:
        assert model is llama
    back = Steering.load(prompt.save(tmp_path / "p"))
    assert back == prompt and back.system_prompt == "Be brief."
