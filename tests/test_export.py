"""Exports: llama.cpp control-vector GGUF, lm-eval steered file, HF folder with the edit folded in.

Each export is checked against the hooked model it replaces: the GGUF is read back with the `gguf`
package (names, shapes, float32 values); the lm-eval file is applied the way lm-eval applies it
(forward hooks on `model.base_model`'s named modules; with lm-eval's own `steer` when installed) and
the HF folder is reloaded with stock transformers; logits match the hooked model's within 1e-4
(float32, tiny models).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import finesteer as fs
from finesteer.cli import app
from finesteer.export import (
    ExportError,
    export_artifact,
    export_hf,
    read_control_vector,
    steer_config,
    verify_hf,
    write_control_vector,
    write_steer_file,
)
from finesteer.fit.steering import Steering
from finesteer.interventions import Add, Edit, Intervention, ProjectOut, Scale, SetTo, Zero
from finesteer.models import LoadedModel
from finesteer.sites import Site
from tests.conftest import chat

ATOL = 1e-4
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def _texts(lm: LoadedModel) -> list[str]:
    return [chat(lm, "hello there"), chat(lm, "a longer prompt, padded less"), "hi"]


def _logits(lm: LoadedModel, texts: list[str], model: nn.Module | None = None) -> torch.Tensor:
    enc = lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )
    with torch.no_grad():
        logits = (model or lm.model)(**enc).logits
    return logits[enc["attention_mask"].bool()]


def _hooked(lm: LoadedModel, texts: list[str], intervention: Intervention) -> torch.Tensor:
    with fs.intervene(lm, intervention):
        return _logits(lm, texts)


def _vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# --- llama.cpp control vectors ---------------------------------------------------------------------


def test_gguf_control_vector_reads_back(tmp_path: Path, tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    hidden, n_layers = lm.info.hidden_size, lm.info.n_layers
    v1, v2, v3 = _vec(hidden, 1), _vec(hidden, 2), _vec(hidden, 3)
    iv = (
        fs.steer_residual(1, v1, 2.0)
        + fs.steer_residual(1, v2, -0.5)
        + fs.steer_residual(2, v3, 1.5, component="resid_post")
    )
    path = write_control_vector(
        iv, tmp_path / "cv.gguf", n_layers=n_layers, hidden_size=hidden, family="llama"
    )
    meta, vectors = read_control_vector(path)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama" and meta["controlvector.layer_count"] == n_layers - 1
    assert sorted(vectors) == list(range(1, n_layers))  # llama.cpp: direction.1 … direction.{n-1}
    torch.testing.assert_close(vectors[1], 2.0 * v1 - 0.5 * v2, atol=1e-6, rtol=0)
    torch.testing.assert_close(vectors[2], 1.5 * v3, atol=1e-6, rtol=0)
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == {f"direction.{i}" for i in range(1, n_layers)}
    assert all(
        t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [hidden] for t in reader.tensors
    )


def test_gguf_resid_pre_maps_to_the_previous_layer(tmp_path: Path) -> None:
    v = _vec(8, 0)
    iv = fs.steer_residual(2, v, 1.0, component="resid_pre")
    _, vectors = read_control_vector(write_control_vector(iv, tmp_path / "a.gguf", n_layers=3, hidden_size=8))
    torch.testing.assert_close(vectors[1], v)


@pytest.mark.parametrize(
    ("intervention", "message"),
    [
        (fs.steer_head(1, 0, torch.ones(16), scope="all"), "head-level edit, not a residual-stream vector"),
        (fs.steer_residual(1, torch.ones(64), scope="last"), "only static edits"),
        (fs.steer_residual(0, torch.ones(64)), "no control vector for layer 0"),
        (Intervention((Edit(Site(1, "attn_out"), Add(torch.ones(64))),)), "not the residual stream"),
        (fs.project_out(torch.ones(64), [1]), "can only add a vector"),
        (fs.steer_residual(1, torch.ones(64), 0.0), "nothing to export"),
    ],
)
def test_gguf_refuses_what_llama_cpp_cannot_apply(
    tmp_path: Path, intervention: Intervention, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        write_control_vector(intervention, tmp_path / "x.gguf", n_layers=3, hidden_size=64)


# --- lm-evaluation-harness steered ----------------------------------------------------------------


def _apply_like_lm_eval(lm: LoadedModel, config: dict, texts: list[str]) -> torch.Tensor:
    """lm-eval's `steered` semantics: forward hooks on `model.base_model`'s named modules."""
    if HAS_LM_EVAL:
        from lm_eval.models.hf_steered import SteeredModel, steer

        hooks = {}
        for point, info in config.items():
            vector = info["steering_vector"].to(lm.dtype)
            if info["action"] == "add":
                hooks[point] = lambda acts, v=vector * info["steering_coefficient"]: SteeredModel.add(
                    acts, v, None
                )
            else:
                direction = vector / vector.norm()
                hooks[point] = lambda acts, d=direction, c=info["steering_coefficient"]: SteeredModel.clamp(
                    acts, d, c, None
                )
        with steer(lm.model, hooks):
            return _logits(lm, texts)
    modules = dict(lm.model.base_model.named_modules())
    handles = []
    for point, info in config.items():
        vector = info["steering_vector"]

        def hook(module, args, output, info=info, vector=vector):
            acts = output[0] if isinstance(output, tuple) else output
            if info["action"] == "add":
                new = acts + info["steering_coefficient"] * vector
            else:
                unit = vector / vector.norm()
                new = acts + unit * (info["steering_coefficient"] - (acts * unit).sum(-1, keepdim=True))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handles.append(modules[point].register_forward_hook(hook))
    try:
        return _logits(lm, texts)
    finally:
        for handle in handles:
            handle.remove()


def _lm_eval_cases(lm: LoadedModel) -> dict[str, Intervention]:
    hidden, d = lm.info.hidden_size, lm.info.head_dim
    cases = {
        "resid_post": fs.steer_residual(1, _vec(hidden, 1), 3.0)
        + fs.steer_residual(1, _vec(hidden, 2), -1.0),
        "resid_pre": fs.steer_residual(2, _vec(hidden, 3), 2.0, component="resid_pre"),
        "head": fs.steer_head(1, 1, _vec(d, 4), 3.0, scope="all")
        + fs.steer_head(2, 0, _vec(d, 5), 2.0, scope="all"),
        "attn_mlp": Intervention(
            (
                Edit(Site(0, "attn_out"), Add(_vec(hidden, 6), 2.0)),
                Edit(Site(1, "mlp_out"), Add(_vec(hidden, 7), 2.0)),
            )
        ),
        "project_out": fs.project_out(_vec(hidden, 8), [1]),
    }
    if lm.adapter.query_module == lm.adapter.q_proj:
        cases["query"] = Intervention((Edit(Site(1, "q", 2), Add(_vec(d, 9), 2.0)),))
    return cases


def test_lm_eval_file_applies_like_the_hooked_model(tmp_path: Path, tiny: LoadedModel) -> None:
    texts = _texts(tiny)
    for name, iv in _lm_eval_cases(tiny).items():
        path = write_steer_file(iv, tiny, tmp_path / f"{name}.pt")
        config = torch.load(path, weights_only=True)  # lm-eval 0.4 loads it this way (or weights_only=False)
        assert all(
            set(entry) == {"action", "steering_vector", "steering_coefficient", "bias", "head_index"}
            and entry["steering_vector"].dim() == 1
            for entry in config.values()
        )
        hooked = _hooked(tiny, texts, iv)
        assert not torch.allclose(hooked, _logits(tiny, texts), atol=1e-2), name
        torch.testing.assert_close(_apply_like_lm_eval(tiny, config, texts), hooked, atol=ATOL, rtol=ATOL)


def test_lm_eval_hookpoints_are_module_names(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    config = steer_config(
        fs.steer_residual(1, torch.ones(64)) + fs.steer_head(2, 1, torch.ones(16), scope="all"), lm
    )
    assert sorted(config) == ["layers.1", "layers.2.self_attn.o_proj"]
    names = dict(lm.model.base_model.named_modules())
    assert all(point in names for point in config)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed")
def test_lm_eval_steered_model_loads_the_file(tmp_path: Path, tiny_models: dict[str, LoadedModel]) -> None:
    from lm_eval.models.hf_steered import SteeredModel

    lm = tiny_models["tiny-llama"]
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    iv = fs.steer_residual(1, _vec(64, 1), 3.0) + fs.steer_head(1, 2, _vec(16, 2), 2.0, scope="all")
    path = write_steer_file(iv, lm, tmp_path / "steer.pt")
    steered = SteeredModel(pretrained=str(folder), steer_path=str(path), device="cpu", batch_size=1)
    enc = lm.tokenizer(["hello there"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        theirs = steered.forward(enc["input_ids"]).logits[0]
    torch.testing.assert_close(theirs, _hooked(lm, ["hello there"], iv), atol=ATOL, rtol=ATOL)


def test_lm_eval_refuses_what_it_cannot_express(tmp_path: Path, tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    with pytest.raises(ExportError, match="only static edits"):
        write_steer_file(fs.steer_head(1, 1, torch.ones(16)), lm, tmp_path / "a.pt")  # scope 'last'
    with pytest.raises(ExportError, match="'scale'"):
        write_steer_file(fs.ablate_head(1, 1, "scale_output"), lm, tmp_path / "b.pt")
    with pytest.raises(ExportError, match=r"\.pt or \.pth"):
        write_steer_file(fs.steer_residual(1, torch.ones(64)), lm, tmp_path / "c.json")


# --- HF folder with the edit folded in ------------------------------------------------------------


def _fold_cases(lm: LoadedModel) -> dict[str, Intervention]:
    hidden, d = lm.info.hidden_size, lm.info.head_dim
    return {
        "head_add": fs.steer_head(1, 1, _vec(d, 1), 3.0, scope="all")
        + fs.steer_head(1, 2, _vec(d, 2), 2.0, scope="all"),
        "resid_add": fs.steer_residual(1, _vec(hidden, 3), 2.0)
        + fs.steer_residual(2, _vec(hidden, 4), 1.0, component="resid_pre"),
        "attn_out_add": Intervention((Edit(Site(0, "attn_out"), Add(_vec(hidden, 5), 2.0)),)),
        "head_scale_zero_mean": Intervention(
            (
                Edit(Site(0, "z", 1), Scale(0.3)),
                Edit(Site(1, "z", 0), Zero()),
                Edit(Site(2, "z", 3), SetTo(_vec(d, 6))),
            )
        ),
        "project_out_mlp": Intervention((Edit(Site(1, "mlp_out"), ProjectOut(_vec(hidden, 7))),)),
        "uniform_attention": Intervention((Edit(Site(1, "q", 2), Scale(1e-5)),)),
    }


# What folds where (stock transformers 5.x): o_proj bias via `attention_bias` (llama, qwen3, gemma*, olmo2,
# granite), down_proj bias via `mlp_bias` (llama, granite); a norm after the MLP (gemma2/3, olmo2) blocks
# residual folds; a q_norm (qwen3, gemma3) blocks query folds. Weight-only folds (Scale, Zero, ProjectOut
# on a head or a sublayer output) work everywhere.
EXPECTED_REFUSALS = {
    "tiny-llama": {},
    "tiny-qwen2": {
        "head_add": "no config flag",
        "resid_add": "no config flag",
        "attn_out_add": "no config flag",
        "head_scale_zero_mean": "no config flag",  # SetTo (mean ablation) needs an o_proj bias
    },
    "tiny-mistral": {
        "head_add": "no config flag",
        "resid_add": "no config flag",
        "attn_out_add": "no config flag",
        "head_scale_zero_mean": "no config flag",  # SetTo (mean ablation) needs an o_proj bias
    },
    "tiny-gemma3": {"resid_add": "a norm follows the MLP", "uniform_attention": "q_norm"},
}


def test_hf_fold_matches_the_hooked_model_or_refuses(tmp_path: Path, tiny: LoadedModel) -> None:
    texts = _texts(tiny)
    refusals = EXPECTED_REFUSALS[tiny.name]
    for name, iv in _fold_cases(tiny).items():
        out = tmp_path / name
        if name in refusals:
            with pytest.raises(ExportError, match=refusals[name]):
                export_hf(iv, tiny, out)
            continue
        export_hf(iv, tiny, out)
        report = verify_hf(iv, tiny, out, texts, atol=ATOL)
        assert report["within_atol"], (name, report)
        assert report["max_abs_change_vs_unsteered"] > 1e-2, name
        record = json.loads((out / "finesteer_export.json").read_text())
        assert record["format"] == "hf-folded" and record["intervention_digest"] == iv.digest()


def test_hf_fold_loads_with_stock_transformers_only(
    tmp_path: Path, tiny_models: dict[str, LoadedModel]
) -> None:
    from transformers import AutoModelForCausalLM

    lm = tiny_models["tiny-llama"]
    iv = fs.steer_head(1, 1, _vec(16, 1), 3.0, scope="all") + fs.steer_residual(1, _vec(64, 2), 2.0)
    export_hf(iv, lm, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in lm.model.parameters())
    torch.testing.assert_close(
        _logits(lm, _texts(lm), model), _hooked(lm, _texts(lm), iv), atol=ATOL, rtol=ATOL
    )
    assert not any(
        n.endswith("bias") for n, _ in lm.model.named_parameters()
    )  # the loaded model is untouched


def test_hf_fold_refuses_position_limited_edits(tmp_path: Path, tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    with pytest.raises(ExportError, match="acts on positions 'last'"):
        export_hf(fs.steer_head(1, 1, torch.ones(16)), lm, tmp_path / "a")
    with pytest.raises(ExportError, match="batch rows"):
        export_hf(fs.steer_residual(1, torch.ones(64)).on_rows([0]), lm, tmp_path / "b")


# --- export_artifact and the CLI ------------------------------------------------------------------


def test_export_cli_all_formats(tmp_path: Path, tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    steering = Steering("caa", fs.steer_residual(1, _vec(64, 1), 2.0, scope="from_end:3"), {"layer": 1})
    steering.save(tmp_path / "art", lm)
    runner = CliRunner()
    refused = runner.invoke(app, ["export", "gguf", str(tmp_path / "art"), "--out", str(tmp_path / "a.gguf")])
    assert refused.exit_code == 2 and "from_end:3" in refused.output and "--all-positions" in refused.output
    for fmt, out in (("gguf", "a.gguf"), ("lm-eval", "a.pt"), ("hf", "hf")):
        result = runner.invoke(
            app,
            ["export", fmt, str(tmp_path / "art"), "--out", str(tmp_path / out), "--all-positions", "--json"],
        )
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["rescoped"] == ["blocks.1.hook_resid_post: from_end:3 -> all"]
        if fmt == "gguf":
            assert payload["layers"] == [1] and payload["n_tensors"] == 2
        if fmt == "hf":
            assert payload["verify"]["within_atol"], payload


def test_export_artifact_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format"):
        export_artifact("onnx", tmp_path, tmp_path / "x")
