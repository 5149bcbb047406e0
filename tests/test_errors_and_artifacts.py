"""Bad input fails with a message naming the problem; artifacts and captures round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer.activations.capture import CaptureError
from finesteer.artifacts import ArtifactError
from finesteer.interventions import InterventionError, OpError
from finesteer.models import LoadedModel, UnsupportedArchitectureError, wrap_model
from finesteer.sites import Site, SiteError, parse_heads

from .conftest import chat


@pytest.fixture
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-qwen2"]


def test_head_out_of_range(lm: LoadedModel) -> None:
    with (
        pytest.raises(SiteError, match=r"head 4 out of range; model has 4 query heads \(0..3\)"),
        fs.intervene(lm, fs.steer_head(0, 4, torch.zeros(lm.info.head_dim))),
    ):
        pass


def test_layer_missing(lm: LoadedModel) -> None:
    with (
        pytest.raises(SiteError, match=r"layer 3 out of range; model has 3 layers"),
        fs.intervene(lm, fs.ablate_head(3, 0)),
    ):
        pass
    with pytest.raises(SiteError, match=r"layer 9"):
        fs.capture(lm, ["x"], ["blocks.9.hook_resid_post"])


def test_vector_wrong_size(lm: LoadedModel) -> None:
    with (
        pytest.raises(InterventionError, match=r"has 10 elements; this site takes head_dim=16"),
        fs.intervene(lm, fs.steer_head(0, 0, torch.zeros(10))),
    ):
        pass
    with (
        pytest.raises(InterventionError, match="site width=64"),
        fs.intervene(lm, fs.steer_residual(0, torch.zeros(65))),
    ):
        pass


def test_nan_vector_and_bad_names() -> None:
    with pytest.raises(OpError, match="NaN"):
        fs.steer_head(0, 0, torch.tensor([1.0, float("nan")]))
    with pytest.raises(SiteError, match="cannot parse site"):
        Site.parse("blocks.x.attn.hook_z")
    with pytest.raises(SiteError, match="has no heads"):
        Site(0, "resid_post", 3)
    with pytest.raises(SiteError, match=r"LAYER\.HEAD"):
        parse_heads("12-3")
    assert parse_heads("12.3, 13.1") == [(12, 3), (13, 1)]
    with pytest.raises(InterventionError, match="unknown ablation"):
        fs.ablate_head(0, 0, "bogus")  # type: ignore[arg-type]


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fs.load_model("smollm2-135m")


def test_unsupported_architecture() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from finesteer.models.tiny import tiny_tokenizer

    config = GPTNeoXConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=103
    )
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt_neox'"):
        wrap_model(GPTNeoXForCausalLM(config), tiny_tokenizer(), "neox-tiny")


def test_site_names_roundtrip() -> None:
    for text in (
        "blocks.3.attn.hook_z[5]",
        "blocks.3.attn.hook_q[0]",
        "blocks.0.hook_resid_post",
        "blocks.2.hook_mlp_out",
    ):
        assert Site.parse(text).name == text
    assert Site.parse("ln_final.hook_normalized", n_layers=30) == Site(29, "ln_final")


def test_artifact_roundtrip_gives_identical_generation(tmp_path: Path, lm: LoadedModel) -> None:
    intervention = (
        fs.steer_head(1, 0, torch.randn(lm.info.head_dim), 5.0)
        + fs.ablate_head(2, 1, "uniform_attention")
        + fs.steer_residual(0, torch.randn(lm.info.hidden_size), 2.0, scope="from:3")
        + fs.project_out(torch.randn(lm.info.hidden_size), [1])
    )
    folder = fs.save_intervention(tmp_path / "art", intervention, lm, metadata={"method": "test"})
    spec = json.loads((folder / "intervention.json").read_text())
    assert spec["edits"][0]["site"] == "blocks.1.attn.hook_z[0]" and spec["model"]["info"]["head_dim"] == 16
    artifact = fs.load_intervention(folder)
    assert artifact.intervention == intervention and artifact.metadata == {"method": "test"}
    artifact.check_model(lm)
    prompt = [chat(lm, "tell me")]
    assert fs.generate(lm, prompt, max_new_tokens=10, intervention=artifact.intervention) == fs.generate(
        lm, prompt, max_new_tokens=10, intervention=intervention
    )


def test_artifact_errors(tmp_path: Path, lm: LoadedModel, tiny_models: dict[str, LoadedModel]) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        fs.load_intervention(tmp_path)
    folder = fs.save_intervention(tmp_path / "a", fs.ablate_head(0, 0), lm)
    spec = json.loads((folder / "intervention.json").read_text())
    spec["edits"][0]["op"] = "explode"
    (folder / "intervention.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match=r"edit 0 is malformed.*unknown operation 'explode'"):
        fs.load_intervention(folder)
    other = fs.load_intervention(fs.save_intervention(tmp_path / "b", fs.ablate_head(0, 0), lm))
    with pytest.raises(ArtifactError, match="made for tiny-qwen2"):
        other.check_model(tiny_models["tiny-gemma3"])


def test_capture_batched_equals_unbatched_and_saves(tmp_path: Path, tiny: LoadedModel) -> None:
    texts = [chat(tiny, t) for t in ("one", "a second, longer prompt", "three")]
    sites = [
        "blocks.1.attn.hook_z",
        "blocks.0.attn.hook_q[1]",
        "blocks.2.hook_resid_post",
        "blocks.1.hook_mlp_out",
    ]
    batched = fs.capture(tiny, texts, sites, position=-2, batch_size=3)
    for i, text in enumerate(texts):
        alone = fs.capture(tiny, [text], sites, position=-2)
        for site in sites:
            torch.testing.assert_close(batched[site][i], alone[site][0], atol=1e-5, rtol=1e-5)
    assert batched["blocks.1.attn.hook_z"].shape == (3, tiny.info.n_heads, tiny.info.head_dim)
    path = batched.save(tmp_path / "acts.safetensors")
    loaded = fs.Activations.load(path)
    assert loaded.ids == batched.ids and torch.equal(loaded[sites[0]], batched[sites[0]])


def test_capture_answer_mean_matches_manual(tiny: LoadedModel) -> None:
    prompt, answer = chat(tiny, "question"), "(A) yes"
    pooled = fs.capture(tiny, [(prompt, answer)], ["blocks.1.hook_resid_post"], position="answer_mean")
    every = fs.capture(tiny, [prompt + answer], ["blocks.1.hook_resid_post"], position="all")
    n_prompt = len(tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    manual = every["blocks.1.hook_resid_post"][0, n_prompt:].mean(0)
    torch.testing.assert_close(pooled["blocks.1.hook_resid_post"][0], manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(CaptureError, match="needs \\(prompt, completion\\) pairs"):
        fs.capture(tiny, [prompt], ["blocks.1.hook_resid_post"], position="answer_mean")
    with pytest.raises(CaptureError, match="outside a prompt"):
        fs.capture(tiny, ["ab"], ["blocks.1.hook_resid_post"], position=-5)


def test_peek_model_info_without_loading(tiny_models: dict[str, LoadedModel], tmp_path: Path) -> None:
    from finesteer.models import peek_model_info
    from finesteer.models.registry import REGISTRY

    for name, lm in tiny_models.items():
        assert peek_model_info(name) == lm.info
    assert peek_model_info("smollm2-135m-instruct") == REGISTRY["smollm2-135m-instruct"].info
    tiny_models["tiny-qwen2"].model.config.save_pretrained(tmp_path)
    assert peek_model_info(tmp_path) == tiny_models["tiny-qwen2"].info
    assert peek_model_info(tmp_path / "missing") is None


def test_pad_right_and_left() -> None:
    from finesteer.activations import pad

    ids, mask = pad([[1, 2, 3], [4]], "right", 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([(1, 2, 3), (4,)], "left", 9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        pad([[1]], "middle", 0)  # type: ignore[arg-type]
