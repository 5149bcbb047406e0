"""SAE training checkpoints are safetensors + JSON: nothing is unpickled, resume stays exact (issue 15)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from finesteer.models import load_model
from finesteer.sae import SAEError
from finesteer.sae.corpus import CorpusSpec
from finesteer.sae.pipeline import train_on_model
from finesteer.sae.train import CHECKPOINT, LEGACY_CHECKPOINT, TrainConfig, train_sae

CFG = TrainConfig(
    d_sae=32, k=4, epochs=3, batch_size=64, lr=3e-3, warmup_steps=2, checkpoint_every=4, dead_after=200
)


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 16, generator=generator)
    codes = torch.relu(torch.randn(640, 8, generator=generator))
    return codes @ basis + 0.05 * torch.randn(640, 16, generator=generator)


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _crafted_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    pickle.dump({"step": 1, "payload": _Payload(marker)}, buffer)
    return buffer.getvalue()


def test_checkpoint_is_safetensors_with_json_state(acts: torch.Tensor, tmp_path: Path) -> None:
    train_sae(acts, CFG, run_dir=tmp_path, stop_after=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as handle:
        keys = set(handle.keys())
        state = json.loads(handle.metadata()["finesteer_sae_checkpoint"])
    assert {"sae.W_enc", "sae.W_dec", "sae.b_enc", "sae.b_dec", "since_fired"} <= keys
    assert any(k.startswith("optimizer.0.exp_avg") for k in keys)
    assert state["step"] == 4 and state["n_acts"] == len(acts) and state["train_config"]["d_sae"] == 32


def test_resume_is_exact(acts: torch.Tensor, tmp_path: Path) -> None:
    full = train_sae(acts, CFG, run_dir=tmp_path / "full", progress=False)
    assert full.finished and full.steps > 8
    part = train_sae(acts, CFG, run_dir=tmp_path / "part", stop_after=6, progress=False)
    assert part.steps == 6 and not part.finished
    resumed = train_sae(acts, CFG, run_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == full.steps
    for name, value in full.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=0, atol=0)


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(acts: torch.Tensor, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / LEGACY_CHECKPOINT).write_bytes(_crafted_pickle(marker))
    with pytest.raises(SAEError, match=r"pickle checkpoint.*checkpoint\.safetensors.*never loaded"):
        train_sae(acts, CFG, run_dir=run, resume=True, progress=False)
    assert not marker.exists()
    # a pickle renamed to the new name is not a readable checkpoint either, and does not run
    (run / CHECKPOINT).write_bytes(_crafted_pickle(marker))
    with pytest.raises(SAEError, match="not a readable finesteer checkpoint"):
        train_sae(acts, CFG, run_dir=run, resume=True, progress=False)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(acts: torch.Tensor, tmp_path: Path) -> None:
    train_sae(acts, CFG, run_dir=tmp_path, stop_after=4, progress=False)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SAEError, match="not a readable finesteer checkpoint"):
        train_sae(acts, CFG, run_dir=tmp_path, resume=True, progress=False)


def test_pipeline_refuses_legacy_checkpoint_before_collecting(tmp_path: Path) -> None:
    run = tmp_path / "sae" / "run"
    run.mkdir(parents=True)
    (run / LEGACY_CHECKPOINT).write_bytes(_crafted_pickle(tmp_path / "pwned"))
    lm = load_model("tiny-llama")
    with pytest.raises(SAEError, match="pickle checkpoint"):
        train_on_model(
            lm, 1, tmp_path / "sae", tokens=500, config=CFG, corpus=CorpusSpec(), resume=True, progress=False
        )
    assert not (run / "activations").exists() and not (tmp_path / "pwned").exists()
    with pytest.raises(SAEError, match="already has a training checkpoint"):
        train_on_model(lm, 1, tmp_path / "sae", tokens=500, config=CFG, corpus=CorpusSpec(), progress=False)
