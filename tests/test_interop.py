"""Interop fixes: SAELens TopK SAEs with rescale_acts_by_decoder_norm, JSON output without NaN, heat
maps centred on zero."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import finesteer.evaluate.ab_effect
from finesteer.artifacts import save_intervention
from finesteer.cli import app
from finesteer.cli.common import finite_json
from finesteer.interventions import steer_residual
from finesteer.models import load_model
from finesteer.report.heatmap import color_norm, plot_head_heatmap
from finesteer.sae import load_sae


def _saelens_topk_folder(folder: Path, *, unit_norm: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TopK SAE folder as SAELens 6 writes it (`save_inference_model`): cfg.json with
    rescale_acts_by_decoder_norm true, and sae_weights.safetensors."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = 8, 24
    w_dec = torch.randn(d_sae, d_in, generator=g)
    norms = torch.ones(d_sae) if unit_norm else torch.rand(d_sae, generator=g) * 2 + 0.25
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * norms[:, None]
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": w_dec.contiguous(),
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    folder.mkdir(parents=True)
    save_file(state, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk", "k": 4,
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"sae_lens_version": "6.12.1", "model_name": "tiny-llama",
                     "hook_name": "blocks.1.hook_resid_post", "hook_head_index": None, "prepend_bos": True,
                     "dataset_path": "x", "context_size": 128},
    }  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return state


def _saelens_reference(state: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """SAELens' TopKSAE.encode/decode with rescale_acts_by_decoder_norm=True, written out."""
    norms = state["W_dec"].norm(dim=-1)
    hidden_pre = ((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]) * norms
    top = torch.topk(hidden_pre, k=k, dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    recon = (acts / norms) @ state["W_dec"] + state["b_dec"]
    return acts, recon


@pytest.mark.parametrize("unit_norm", [True, False], ids=["unit-norm decoder", "drifted decoder norms"])
def test_saelens_topk_with_decoder_norm_rescaling_loads_and_matches(tmp_path: Path, unit_norm: bool) -> None:
    state = _saelens_topk_folder(tmp_path / "sae", unit_norm=unit_norm)
    sae = load_sae(tmp_path / "sae")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    acts, recon = _saelens_reference(state, x, k=4)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), acts, atol=1e-5)
        assert torch.allclose(sae.decode(sae.encode(x)), recon, atol=1e-5)
    if unit_norm:  # nothing to fold: the weights are SAELens' own
        assert torch.equal(sae.W_enc.detach(), state["W_enc"])


def test_rescaling_on_a_non_topk_sae_is_refused(tmp_path: Path) -> None:
    _saelens_topk_folder(tmp_path / "sae", unit_norm=True)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["architecture"] = "standard"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="implements for topk SAEs only"):
        load_sae(tmp_path / "sae")


def test_finite_json_replaces_nan_and_says_why() -> None:
    warnings: list[str] = []
    clean = finite_json({"a": math.nan, "rows": [1.0, math.inf], "n": {"x": -math.inf}}, "", warnings)
    assert clean["a"] is None and "nan" in clean["a_reason"]
    assert clean["rows"] == [1.0, None] and warnings == ["rows[1] was inf (not finite), written as null"]
    assert clean["n"]["x"] is None and "n" in clean and "x_reason" in clean["n"]


def test_cli_json_never_prints_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced NaN in a command's result comes out as null plus a reason, and stdout is strict JSON."""
    real = finesteer.evaluate.ab_effect.ab_rates

    def nan_rates(*args: object, **kwargs: object) -> dict[str, object]:
        rates = real(*args, **kwargs)  # type: ignore[arg-type]
        return {**rates, "mean_p_matching": math.nan, "per_item": [math.inf]}

    monkeypatch.setattr(finesteer.evaluate.ab_effect, "ab_rates", nan_rates)
    result = CliRunner().invoke(
        app, ["eval", "ab", "tiny-llama", "--data", "coordinate-other-ais", "--limit", "2",
              "--method", "prob", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    payload = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert payload["mean_p_matching"] is None and "not finite" in payload["mean_p_matching_reason"]
    assert payload["warnings"] == ["per_item[0] was inf (not finite), written as null"]


def test_diverging_heatmaps_are_centred_on_zero(tmp_path: Path) -> None:
    gains = torch.tensor([[-0.4, -0.1, 0.0], [-0.2, -0.3, -0.05]])  # all ≤ 0
    norm = color_norm(gains.numpy(), "RdBu_r", None)
    assert norm(0.0) == pytest.approx(0.5) and norm(-0.4) == pytest.approx(0.0, abs=1e-6)
    assert all(norm(float(v)) <= 0.5 for v in gains.flatten())  # none on the "better" (red) side
    baseline = color_norm(np.array([[0.5, 0.7], [0.6, 0.55]]), "viridis", 0.5)
    assert baseline(0.5) == pytest.approx(0.5)
    plain = color_norm(gains.numpy(), "viridis", None)
    plain.autoscale(gains.numpy())
    assert plain(-0.4) == pytest.approx(0.0, abs=1e-6) and plain(0.0) == pytest.approx(1.0)
    path = plot_head_heatmap(gains, tmp_path / "gains.png", cmap="RdBu_r", title="gains")
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize(("scope", "blind"), [("last", True), ("all", False)])
def test_helpfulness_says_when_perplexity_is_blind(tmp_path: Path, scope: str, blind: bool) -> None:
    lm = load_model("tiny-llama")
    steer = steer_residual(1, torch.ones(lm.info.hidden_size), 2.0, scope=scope)
    folder = save_intervention(tmp_path / "art", steer, lm)
    result = CliRunner().invoke(
        app, ["eval", "helpfulness", "tiny-llama", "-i", str(folder), "--limit", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert ("perplexity_warning" in payload) is blind
    if blind:
        assert "scope last" in payload["perplexity_warning"] and "warning:" in result.stderr
