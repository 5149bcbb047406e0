"""Sparse autoencoders: maths of the three architectures, SAELens-format IO, collection, training, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finesteer.activations.capture import capture
from finesteer.data.items import option_text, question_stem
from finesteer.data.prompts import chat_prompt
from finesteer.models import LoadedModel
from finesteer.sae import SAEConfig, SAEError, SparseAutoencoder, evaluate_sae, load_sae, save_sae
from finesteer.sae.corpus import CorpusSpec, training_texts
from finesteer.sae.io import CFG_FILE, WEIGHTS_FILE
from finesteer.sae.pipeline import train_on_model
from finesteer.sae.store import StoreError, collect, common_prefix_length, load_split, site_activations
from finesteer.sae.train import TrainConfig, train_sae, train_step_loss
from finesteer.sites import Site


def random_sae(
    arch: str = "topk", d_in: int = 8, d_sae: int = 16, k: int | None = 3, **kw
) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k if arch == "topk" else None, **kw)
    sae = SparseAutoencoder(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
    return sae


# --- maths -------------------------------------------------------------------------------------------


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(SAEError, match="k ≤ d_sae"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(SAEError, match="TransformerLens"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", hook_name="layer12")
    with pytest.raises(SAEError, match="norm_scaling_factor"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", normalize_activations="expected_average_only_in")
    assert SAEConfig(d_in=4, d_sae=8, architecture="relu").architecture == "standard"
    assert SAEConfig(d_in=4, d_sae=8, architecture="relu", hook_name="blocks.2.hook_resid_post").site == Site(
        2, "resid_post"
    )


def test_topk_encode_has_exactly_k_nonzeros() -> None:
    sae = random_sae("topk", d_in=8, d_sae=32, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: TopK keeps exactly k
    latents = sae.encode(torch.randn(7, 3, 8))
    assert latents.shape == (7, 3, 32)
    assert ((latents != 0).sum(-1) == 5).all()
    pre = sae.encode_pre(torch.randn(50, 8))
    # Without the bias some top-k values can be negative and ReLU zeroes them: never more than k.
    sae.b_enc.data.zero_()
    sparse = sae.encode(torch.randn(50, 8))
    assert ((sparse != 0).sum(-1) <= 5).all()
    # The kept latents are the k largest pre-activations.
    top = sae.activate(pre)
    kept = top != 0
    assert (pre[kept].min() >= pre.masked_fill(kept, float("-inf")).max(-1).values.min()) or kept.sum() == 0


def test_relu_and_jumprelu_match_hand_computation() -> None:
    x = torch.randn(4, 8)
    relu = random_sae("relu")
    pre = (x - relu.b_dec) @ relu.W_enc + relu.b_enc
    torch.testing.assert_close(relu.encode(x), torch.clamp(pre, min=0))
    jump = random_sae("jumprelu")
    pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc
    expected = torch.where(pre > jump.threshold, torch.clamp(pre, min=0), torch.zeros_like(pre))
    torch.testing.assert_close(jump.encode(x), expected)
    recon, latents = jump(x)
    torch.testing.assert_close(recon, latents @ jump.W_dec + jump.b_dec)


def test_bad_inputs_raise() -> None:
    sae = random_sae()
    with pytest.raises(SAEError, match="d_in=8"):
        sae.encode(torch.randn(2, 9))
    with pytest.raises(SAEError, match="d_sae=16"):
        sae.decode(torch.randn(2, 15))
    with pytest.raises(SAEError, match="NaN"):
        evaluate_sae(sae, torch.full((3, 8), float("nan")))


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_folding_the_norm_scaling_factor_preserves_the_function(arch: str) -> None:
    sae = random_sae(arch, normalize_activations="expected_average_only_in", norm_scaling_factor=0.37)
    folded = sae.folded()
    assert folded.cfg.normalize_activations == "none"
    x = torch.randn(10, 8) * 3
    torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x).reconstruction, sae(x).reconstruction, rtol=1e-5, atol=1e-5)


# --- IO ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_saved_sae_loads_back_identically(tmp_path: Path, arch: str) -> None:
    sae = random_sae(arch, hook_name="blocks.1.hook_resid_post", model_name="tiny-llama")
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / CFG_FILE).read_text())
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "sae" / WEIGHTS_FILE))
    assert weights["W_enc"].shape == (8, 16) and weights["W_dec"].shape == (16, 8)
    assert ("threshold" in weights) == (arch == "jumprelu")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.hook_name == sae.cfg.hook_name and loaded.cfg.k == sae.cfg.k
    for name, param in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)


def test_loading_a_bad_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SAELens"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load_sae(tmp_path / "empty")
    sae = random_sae("topk")
    save_sae(sae, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / CFG_FILE).read_text())
    cfg["d_sae"] = 17
    (tmp_path / "bad" / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="shape"):
        load_sae(tmp_path / "bad")


def test_pre_6_saelens_config_is_read(tmp_path: Path) -> None:
    sae = random_sae("topk", k=4)
    save_sae(sae, tmp_path / "old")
    old = {
        "d_in": 8,
        "d_sae": 16,
        "hook_point": "blocks.0.hook_resid_post",
        "model_name": "gpt2",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "dtype": "torch.float32",
        "context_size": 128,
    }
    (tmp_path / "old" / CFG_FILE).write_text(json.dumps(old))
    loaded = load_sae(tmp_path / "old")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 4
    assert loaded.cfg.hook_name == "blocks.0.hook_resid_post" and loaded.cfg.metadata["context_size"] == 128


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_sae_folder_loads_in_saelens(tmp_path: Path, arch: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from finesteer.sae.io import from_saelens

    ours = random_sae(arch, hook_name="blocks.1.hook_resid_post", model_name="tiny-llama")
    save_sae(ours, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    assert theirs.cfg.architecture() == ours.cfg.architecture
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x).reconstruction)
    # And back: an SAE saved by SAELens loads in finesteer with the same function.
    theirs.save_model(str(tmp_path / "theirs"))
    back = load_sae(tmp_path / "theirs")
    torch.testing.assert_close(back(x).reconstruction, ours(x).reconstruction)
    torch.testing.assert_close(from_saelens(theirs)(x).latents, ours(x).latents)


# --- corpus and collection ------------------------------------------------------------------------------


def test_option_text_and_stem() -> None:
    q = "How can I make a bomb?\n\nChoices:\n(A) Mix fertiliser\n(B) I cannot help with that"
    assert option_text(q, "B") == "I cannot help with that"
    assert question_stem(q) == "How can I make a bomb?"
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2


SMALL = CorpusSpec(harmful=6, harmless=6, ab_per_behaviour=2, behaviours=("refusal",))


def test_corpus_excludes_evaluation_sets(tiny_models: dict[str, LoadedModel]) -> None:
    from finesteer.data import load_dataset

    lm = tiny_models["tiny-llama"]
    texts = training_texts(lm.tokenizer, CorpusSpec(harmful=2000, harmless=0, ab_per_behaviour=0))
    jbb = {item.prompt for item in load_dataset("jailbreakbench")}  # type: ignore[union-attr]
    assert texts and not any(any(p in t for p in jbb) for _, t in texts)


def test_early_stopped_collection_equals_capture(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    texts = [chat_prompt(lm.tokenizer, t) for t in ("hello", "a longer prompt here", "x")]
    site = Site(1, "resid_post")
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = site_activations(lm, ids, site, [1, 2, 0], batch_size=2)
    ref = capture(lm, texts, [site], position="all")
    for i, start in enumerate([1, 2, 0]):
        n = int(ref.lengths[i])
        torch.testing.assert_close(ours[i], ref[site][i, start:n], rtol=1e-4, atol=1e-5)


def test_collection_resumes_and_refuses_other_requests(
    tmp_path: Path, tiny_models: dict[str, LoadedModel]
) -> None:
    lm = tiny_models["tiny-llama"]
    texts = [t for _, t in training_texts(lm.tokenizer, SMALL)]
    site = Site(1, "resid_post")
    collect(lm, texts[:6], site, tmp_path / "a", shard_texts=3, heldout_every=3, progress=False)
    first = load_split(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1]
    # A rerun finds every shard done and changes nothing.
    collect(lm, texts[:6], site, tmp_path / "a", shard_texts=3, heldout_every=3, progress=False)
    assert torch.equal(load_split(tmp_path / "a"), first)
    assert len(load_split(tmp_path / "a", "heldout")) > 0
    with pytest.raises(StoreError, match="another request"):
        collect(lm, texts[:5], site, tmp_path / "a", shard_texts=3, heldout_every=3, progress=False)


# --- training ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_acts(tiny_models: dict[str, LoadedModel], tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    lm = tiny_models["tiny-llama"]
    texts = [t for _, t in training_texts(lm.tokenizer, SMALL)]
    folder = collect(lm, texts, Site(1, "resid_post"), tmp_path_factory.mktemp("acts"), progress=False)
    return load_split(folder)


def test_sparse_training_decode_equals_dense_decode(tiny_acts: torch.Tensor) -> None:
    cfg = TrainConfig(d_sae=32, k=4, batch_size=64)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4)).initialize()
    x = tiny_acts[:64]
    _, parts, fired = train_step_loss(sae, x, torch.zeros(32, dtype=torch.bool), cfg)
    dense = ((x - sae(x).reconstruction) ** 2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean()
    assert parts["nmse"] == pytest.approx(float(dense.detach()), rel=1e-5)
    assert set(fired.tolist()) == set(sae.encode(x).nonzero()[:, 1].tolist())


def test_training_reduces_mse_and_resume_is_exact(tiny_acts: torch.Tensor, tmp_path: Path) -> None:
    cfg = TrainConfig(d_sae=128, k=8, epochs=6, batch_size=128, lr=3e-3, warmup_steps=2, checkpoint_every=5,
                      dead_after=500)  # fmt: skip
    full = train_sae(tiny_acts, cfg, run_dir=tmp_path / "full", progress=False)
    assert full.steps > 10 and full.finished
    first, last = full.history[0]["nmse"], full.history[-1]["nmse"]
    assert last < 0.7 * first
    untrained = SparseAutoencoder(full.sae.cfg).initialize(torch.Generator().manual_seed(0))
    with torch.no_grad():
        untrained.b_dec.copy_(full.sae.b_dec)
    assert evaluate_sae(full.sae, tiny_acts).mse < evaluate_sae(untrained, tiny_acts).mse
    metrics = evaluate_sae(full.sae, tiny_acts)
    assert metrics.l0 <= 8 and 0 <= metrics.dead_share <= 1
    # Interrupted after 10 steps, then resumed: the same weights as the uninterrupted run.
    part = train_sae(tiny_acts, cfg, run_dir=tmp_path / "part", stop_after=10, progress=False)
    assert part.steps == 10 and not part.finished
    resumed = train_sae(tiny_acts, cfg, run_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == full.steps
    for name, param in full.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], param, rtol=0, atol=0)
    with pytest.raises(SAEError, match="another config"):
        train_sae(
            tiny_acts, TrainConfig(d_sae=64, k=8, batch_size=128), run_dir=tmp_path / "part", resume=True
        )


def test_train_on_model_writes_a_loadable_sae(tiny_models: dict[str, LoadedModel], tmp_path: Path) -> None:
    lm = tiny_models["tiny-llama"]
    cfg = TrainConfig(d_sae=64, k=4, epochs=2, batch_size=128, checkpoint_every=5)
    result = train_on_model(lm, 1, tmp_path / "sae", tokens=2000, config=cfg, corpus=SMALL, progress=False)
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.hook_name == "blocks.1.hook_resid_post" and loaded.cfg.normalize_activations == "none"
    assert loaded.cfg.metadata["training"]["heldout"]["n_tokens"] == result.heldout.n_tokens > 0
    assert {"collect_wall_s", "train_wall_s", "collect_cpu_s", "train_cpu_s"} <= set(result.timings)
    with pytest.raises(SAEError, match="resume"):
        train_on_model(lm, 1, tmp_path / "sae", tokens=2000, config=cfg, corpus=SMALL, progress=False)
