"""Devices and dtypes: option parsing, bf16 loading, and the intervention invariants in bf16 on CPU.

Tolerances in bf16 (8 bits of mantissa: one step is 1/32 for logits in [4, 8)), on logits of magnitude
≤ ~7 on these tiny models: α = 0 is exact (the hook is skipped, logits and greedy text identical);
per-row = solo within atol 0.1 / rtol 0.05 (observed: exactly equal on CPU); head add = W_O column add
within atol 0.25 / rtol 0.05 (observed max 0.0625, two bf16 steps: the two routes round the added
vector at different points). The same checks in float32 hold to 1e-4 (tests/test_interventions.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import finesteer as fs
from finesteer.cli import app
from finesteer.interventions import Add, Edit, Intervention
from finesteer.models import LoadedModel, load_model
from finesteer.models.loading import DeviceError, resolve_device, resolve_dtype
from finesteer.sites import Site
from tests.conftest import FAMILIES, chat

BF16_ATOL, BF16_RTOL = 0.1, 0.05  # per-row = solo
HEAD_ADD_ATOL = 0.25  # head add = W_O column add


@pytest.fixture(scope="module")
def bf16_models() -> dict[str, LoadedModel]:
    return {name: load_model(name, dtype="bfloat16", device="cpu") for name in FAMILIES}


@pytest.fixture(params=FAMILIES)
def bf16(request: pytest.FixtureRequest, bf16_models: dict[str, LoadedModel]) -> LoadedModel:
    return bf16_models[request.param]


def _texts(lm: LoadedModel) -> list[str]:
    return [chat(lm, t) for t in ("hello there", "a much longer prompt, padded less", "hi")]


def _logits(lm: LoadedModel, texts: list[str], intervention: Intervention | None = None) -> torch.Tensor:
    enc = lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if intervention is None:
            return lm.model(**enc, position_ids=position_ids).logits.float()
        with fs.intervene(lm, intervention):
            return lm.model(**enc, position_ids=position_ids).logits.float()


def test_dtype_and_device_names() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.float32) is torch.float32
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) is torch.float32
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_model("tiny-llama", device="cuda:0")


def test_bf16_model_reports_its_dtype_and_device(bf16: LoadedModel) -> None:
    assert bf16.dtype is torch.bfloat16 and bf16.device.type == "cpu" and bf16.device_map is None
    assert all(p.dtype is torch.bfloat16 for p in bf16.model.parameters())


def test_bf16_alpha_zero_is_a_no_op(bf16: LoadedModel) -> None:
    texts = _texts(bf16)
    zero = fs.steer_head(1, 1, torch.randn(bf16.info.head_dim) * 100, 0.0, scope="all") + fs.steer_residual(
        1, torch.randn(bf16.info.hidden_size) * 100, 0.0
    )
    assert torch.equal(_logits(bf16, texts, zero), _logits(bf16, texts))
    assert fs.generate(bf16, texts, max_new_tokens=8, intervention=zero) == fs.generate(
        bf16, texts, max_new_tokens=8
    )


def test_bf16_per_row_equals_rows_run_alone(bf16: LoadedModel) -> None:
    texts = _texts(bf16)
    rows = [
        fs.ablate_head(0, 1, "uniform_attention"),
        fs.steer_head(1, 0, torch.randn(bf16.info.head_dim), 4.0, scope="all"),
        fs.ablate_head(2, 3, "zero") + fs.steer_residual(1, torch.randn(bf16.info.hidden_size), 2.0),
    ]
    batched = _logits(bf16, texts, Intervention.per_row(rows))
    mask = bf16.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")["attention_mask"]
    for i, (text, intervention) in enumerate(zip(texts, rows, strict=True)):
        alone = _logits(bf16, [text], intervention)[0]
        torch.testing.assert_close(batched[i][mask[i].bool()], alone, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_bf16_head_add_equals_wo_column_add(bf16: LoadedModel) -> None:
    texts = _texts(bf16)
    layer, head, d = 1, bf16.info.n_heads - 1, bf16.info.head_dim
    theta = torch.randn(d)
    o_proj = bf16.adapter.attn_part(bf16.model, layer, "o_proj")
    via_wo = o_proj.weight[:, head * d : (head + 1) * d].detach().float() @ theta
    a = _logits(bf16, texts, fs.steer_head(layer, head, theta, scope="all"))
    b = _logits(bf16, texts, Intervention((Edit(Site(layer, "attn_out"), Add(via_wo)),)))
    assert not torch.allclose(a, _logits(bf16, texts), atol=1.0)
    torch.testing.assert_close(a, b, atol=HEAD_ADD_ATOL, rtol=BF16_RTOL)


def test_bf16_capture_returns_float32(bf16: LoadedModel) -> None:
    pairs = [(text, " (A)") for text in _texts(bf16)]
    for position in ("last", "answer_mean"):
        acts = fs.capture(bf16, pairs, ["blocks.1.hook_resid_post"], position=position)
        value = acts["blocks.1.hook_resid_post"]
        assert value.dtype is torch.float32 and value.shape == (3, bf16.info.hidden_size)
        assert torch.isfinite(value).all()


def test_cli_info_device_and_dtype() -> None:
    result = CliRunner().invoke(
        app, ["info", "tiny-llama", "--device", "cpu", "--dtype", "bfloat16", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu"
    bad = CliRunner().invoke(app, ["info", "tiny-llama", "--dtype", "int4"])
    assert bad.exit_code == 2 and "unknown dtype 'int4'" in bad.output


def test_cli_generate_in_bf16() -> None:
    result = CliRunner().invoke(
        app, ["generate", "tiny-llama", "hi", "--max-new-tokens", "4", "--dtype", "bfloat16", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["output"], str)


def test_gpu_smoke_script_checks_pass_on_cpu() -> None:
    """benchmarks/gpu_smoke.py's checks, run on the CPU in bf16 (the script itself skips without CUDA)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.check("tiny-llama", "bfloat16", "cpu", None)
    assert row["ok"], row
    assert row["dtype"] == "bfloat16" and row["placement"] == "cpu" and row["change_by_edit"] > 0
