from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.interventions import ablate_heads, intervene
from finesteer.models import LoadedModel
from finesteer.surgery import SURGERY_FILE, SurgeryError, export_surgery, verify_export

HEADS = {
    "tiny-llama": [(0, 1), (2, 3)],
    "tiny-qwen2": [(1, 0), (1, 3)],
    "tiny-mistral": [(0, 7), (2, 2)],
    "tiny-gpt2": [(0, 2), (2, 1)],  # fused c_attn, Conv1D weights stored [in, out]
    "tiny-phi3": [(1, 3), (2, 0)],  # fused qkv_proj
}


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_export_reproduces_hooked_logits(tiny_models, tmp_path, name, mode):
    lm: LoadedModel = tiny_models[name]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    folder = export_surgery(lm, HEADS[name], tmp_path / "out", mode=mode, eps=1e-5)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # source untouched
    report = verify_export(lm, HEADS[name], folder, mode=mode, eps=1e-5)
    assert report["allclose"], report
    assert report["max_abs_change_vs_unablated"] > 1e-3  # the ablation really changes the outputs
    # Independently: plain transformers, no finesteer hooks, equals the hooked model.
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = lm.tokenizer(["a short prompt", "hi"], return_tensors="pt", padding=True, padding_side="right")
    method = "uniform_attention" if mode == "ua" else "scale_output"
    with torch.no_grad():
        with intervene(lm, ablate_heads(HEADS[name], method, eps=1e-5)):
            hooked = lm.model(**ids).logits
        exported = plain(**ids).logits
    mask = ids["attention_mask"].bool()
    torch.testing.assert_close(exported[mask], hooked[mask], atol=1e-4, rtol=1e-4)
    record = json.loads((folder / SURGERY_FILE).read_text())
    assert record["mode"] == mode and record["heads"] == [f"{a}.{b}" for a, b in HEADS[name]]


def test_gqa_scale_output_leaves_shared_value_rows_alone(tiny_models, tmp_path):
    lm = tiny_models["tiny-qwen2"]  # 4 query heads share 2 kv heads
    folder = export_surgery(lm, [(1, 3)], tmp_path / "out", mode="sc", eps=0.0)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    attn, source = plain.model.layers[1].self_attn, lm.model.model.layers[1].self_attn
    assert torch.equal(attn.v_proj.weight, source.v_proj.weight)
    dim = lm.info.head_dim
    assert bool((attn.o_proj.weight[:, 3 * dim :] == 0).all())
    assert torch.equal(attn.o_proj.weight[:, : 3 * dim], source.o_proj.weight[:, : 3 * dim])


def test_qwen2_query_bias_is_scaled(tiny_models, tmp_path):
    lm = tiny_models["tiny-qwen2"]
    folder = export_surgery(lm, [(0, 2)], tmp_path / "out", mode="ua", eps=0.5)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    dim = lm.info.head_dim
    rows = slice(2 * dim, 3 * dim)
    source = lm.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.bias[rows], source.bias[rows] * 0.5)


def test_shared_query_norm_refuses_uniform_attention_but_allows_scale_output(tiny_models, tmp_path):
    lm = tiny_models["tiny-gemma3"]
    with pytest.raises(SurgeryError, match="q_norm"):
        export_surgery(lm, [(0, 1)], tmp_path / "ua", mode="ua")
    folder = export_surgery(lm, [(0, 1), (2, 0)], tmp_path / "sc", mode="sc")
    assert verify_export(lm, [(0, 1), (2, 0)], folder, mode="sc")["allclose"]


def test_bad_requests(tiny_models, tmp_path):
    lm = tiny_models["tiny-llama"]
    with pytest.raises(SurgeryError, match="unknown head"):
        export_surgery(lm, [(3, 0)], tmp_path / "a")
    with pytest.raises(SurgeryError, match="mode"):
        export_surgery(lm, [(0, 0)], tmp_path / "b", mode="zero")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(SurgeryError, match="not empty"):
        export_surgery(lm, [(0, 0)], tmp_path / "c")


def test_cli_export_surgery(tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(
        app,
        ["export-surgery", "tiny-qwen2", "--heads", "1.0,2.3", "--mode", "ua", "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["verify"]["allclose"] and (out / "config.json").is_file()


@pytest.mark.real_model
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_real_model_export_matches_hooked(tmp_path, mode):
    """SmolLM2 (GQA 9 q / 3 kv heads, tied embeddings): the export reloads and reproduces the hooks."""
    from finesteer.models import load_model

    lm = load_model("smollm2-135m-instruct")
    heads = [(2, 1), (14, 8), (29, 4)]
    folder = export_surgery(lm, heads, tmp_path / "out", mode=mode, eps=1e-5)
    report = verify_export(lm, heads, folder, mode=mode, eps=1e-5)
    assert report["allclose"], report
    assert report["max_abs_change_vs_unablated"] > 1e-2
