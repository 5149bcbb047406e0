from __future__ import annotations

import json

import pytest
import torch

from finesteer.interventions import Intervention, ablate_head, steer_head
from finesteer.locate.attribution.gates import gated_ablation
from finesteer.locate.attribution.metrics import AttributionError, KLDivergence, LetterMargin, TokenLogProb
from finesteer.locate.attribution.prerank import estimate_effects, exact_effects, pre_ranked_scan
from finesteer.locate.engine import ScanError, encode_prompts, prompt_batches
from finesteer.locate.fast_scan import fast_scan, run_scan, start_layer
from finesteer.locate.rank_stats import rank_agreement, spearman, top_k_overlap
from finesteer.locate.scan import KLAndHidden, KLFromBase, LastHidden, LastLogits, scan
from finesteer.locate.ships import ablation, all_heads, format_queries
from finesteer.models import LoadedModel
from tests.conftest import ALL_FAMILIES

QUERIES = (
    "how do I make a weapon",
    "hello there, friend",
    "tell me a secret now please",
    "x",
    "a prompt long enough to pass the tiny gemma sliding window of sixty-four tokens, yes",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared, busy CPU OpenMP spin-waits make each
    op of a multi-threaded run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoded(lm: LoadedModel):
    return encode_prompts(lm, format_queries(lm, QUERIES))


def _candidates(lm: LoadedModel, mode: str) -> list[Intervention]:
    heads = all_heads(lm.info)
    extra = [
        ablation([(0, 1), (2, 0)], mode),  # a group: starts at layer 0
        Intervention(),  # identity: the base itself
        ablation([(1, 1)], mode, eps=1.0),  # identity op: skipped
        steer_head(2, 1, torch.ones(lm.info.head_dim), 0.5, scope="last"),
    ]
    return [ablation([h], mode) for h in heads] + extra


@pytest.mark.parametrize("name", ALL_FAMILIES)
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_fast_scan_equals_simple_scan(tiny_models, name, mode):
    lm = tiny_models[name]
    encoded = _encoded(lm)
    candidates = _candidates(lm, mode)
    base = scan(lm, encoded, [Intervention()], LastLogits(), batch_size=2, progress=False)[0]
    for readout in (KLFromBase(base), LastHidden()):
        simple = scan(lm, encoded, candidates, readout, batch_size=2, progress=False)
        # max_rows 5 → 2 candidates × 2 prompts per forward, 1 candidate where a batch has 1 prompt
        fast = fast_scan(lm, encoded, candidates, readout, batch_size=2, max_rows=5, progress=False)
        assert fast.shape == simple.shape
        assert float((fast - simple).abs().max()) <= 1e-5
        assert float(simple.abs().max()) > 1e-3  # the comparison is not between zeros
        identity = len(all_heads(lm.info)) + 1
        assert torch.equal(fast[identity], simple[identity])  # the base is bit-identical
        assert torch.equal(fast[identity + 1], simple[identity + 1])


@pytest.mark.parametrize("batch_size,max_rows", [(1, 1), (3, 3), (3, 7), (5, 100), (4, 2)])
def test_fast_scan_chunking_boundaries(tiny_models, batch_size, max_rows):
    lm = tiny_models["tiny-qwen2"]
    encoded = _encoded(lm)
    candidates = _candidates(lm, "ua")
    base = scan(lm, encoded, [Intervention()], LastLogits(), batch_size=2, progress=False)[0]
    readout = KLAndHidden(base)
    simple = scan(lm, encoded, candidates, readout, batch_size=batch_size, progress=False)
    fast = fast_scan(
        lm, encoded, candidates, readout, batch_size=batch_size, max_rows=max_rows, progress=False
    )
    assert float((fast - simple).abs().max()) <= 1e-5


def test_fast_scan_runs_only_layers_from_the_first_edit(tiny_models):
    lm = tiny_models["tiny-llama"]
    encoded = _encoded(lm)
    calls = [0] * lm.info.n_layers
    handles = [
        layer.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(lm.model.model.layers)
    ]
    try:
        fast_scan(
            lm, encoded, [ablate_head(2, 0, "scale_output")], LastHidden(), batch_size=5, progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    # one recorded plain forward (+ its replay check from layer 2) and one candidate forward from layer 2
    assert calls == [1, 1, 3]
    assert start_layer(ablation([(1, 0), (0, 3)], "ua"), 3) == 0
    assert start_layer(Intervention(), 3) == 3


def test_fast_scan_checkpoint_is_shared_with_the_simple_scan(tiny_models, tmp_path):
    lm = tiny_models["tiny-qwen2"]
    encoded = _encoded(lm)
    candidates = _candidates(lm, "sc")
    full = scan(lm, encoded, candidates, LastHidden(), batch_size=2, progress=False)

    def stop(index: int) -> None:
        if index == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(
            lm,
            encoded,
            candidates,
            LastHidden(),
            batch_size=2,
            checkpoint=tmp_path,
            checkpoint_every=2,
            progress=False,
            on_candidate=stop,
        )
    done: list[int] = []
    resumed = fast_scan(
        lm,
        encoded,
        candidates,
        LastHidden(),
        batch_size=2,
        checkpoint=tmp_path,
        checkpoint_every=3,
        progress=False,
        on_candidate=done.append,
    )
    assert sorted(done) == list(range(5, len(candidates)))  # 0..4 came from the simple scan's parts
    assert float((resumed - full).abs().max()) <= 1e-5
    again: list[int] = []
    fast_scan(
        lm,
        encoded,
        candidates,
        LastHidden(),
        batch_size=2,
        checkpoint=tmp_path,
        progress=False,
        on_candidate=again.append,
    )
    assert again == []  # everything was checkpointed


def test_fast_scan_small_prefix_budget_rerecords_and_stays_exact(tiny_models):
    lm = tiny_models["tiny-llama"]
    encoded = _encoded(lm)
    candidates = _candidates(lm, "ua")
    simple = scan(lm, encoded, candidates, LastHidden(), batch_size=2, progress=False)
    fast = fast_scan(
        lm,
        encoded,
        candidates,
        LastHidden(),
        batch_size=2,
        max_prefix_bytes=0,
        checkpoint_every=3,
        progress=False,
    )
    assert float((fast - simple).abs().max()) <= 1e-5


def test_fast_scan_errors(tiny_models):
    lm = tiny_models["tiny-llama"]
    with pytest.raises(ScanError, match="no prompts"):
        fast_scan(lm, [], [Intervention()], LastHidden(), progress=False)
    with pytest.raises(ScanError, match="no candidate"):
        fast_scan(lm, ["hi"], [], LastHidden(), progress=False)
    with pytest.raises(ScanError, match="batch rows"):
        fast_scan(lm, ["hi"], [ablation([(0, 0)], "ua").on_rows([0])], LastHidden(), progress=False)
    with pytest.raises(ScanError, match="max_rows"):
        fast_scan(lm, ["hi"], [Intervention()], LastHidden(), max_rows=0, progress=False)
    with pytest.raises(ScanError, match="unknown scan engine"):
        run_scan(lm, ["hi"], [Intervention()], LastHidden(), engine="turbo")


# ------------------------------------------------------------------------------------ attribution


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gpt2", "tiny-phi3"])
def test_gate_one_is_the_uniform_attention_ablation(tiny_models, name):
    """The activation path's end point (a = 1) is the exact `ua` ablation: uniform attention over each
    position's allowed keys (causal prefix; Gemma's sliding window on the long prompt), GQA values."""
    lm = tiny_models[name]
    encoded = _encoded(lm)
    heads = all_heads(lm.info)[:: max(1, len(all_heads(lm.info)) // 5)]
    exact = scan(
        lm, encoded, [ablation([h], "ua") for h in heads], LastLogits(), batch_size=5, progress=False
    )
    batch = prompt_batches(encoded, 5, lm.tokenizer.pad_token_id, lm.device)[0]
    rows = torch.arange(5)
    for (layer, head), expected in zip(heads, exact, strict=True):
        gates = torch.zeros(5, lm.info.n_layers, lm.info.n_heads)
        gates[:, layer, head] = 1.0
        with torch.no_grad(), gated_ablation(lm, gates, "ua"):
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.mask).logits[rows, batch.last]
        # ε = 1e-5 vs its limit 0: the difference is O(ε·q·k)
        assert float((logits - expected[batch.rows]).abs().max()) < 1e-3
    assert float(exact.abs().max()) > 1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_first_order_estimate_is_the_finite_difference_slope(tiny_models, name, mode):
    lm = tiny_models[name]
    encoded = _encoded(lm)
    heads = all_heads(lm.info)
    metric = TokenLogProb([10, 20, 30])
    eps = 1 - 1e-3  # gate 1 → 0.999: the estimate's error is O(δ²), the effect O(δ)
    estimate = estimate_effects(lm, encoded, metric, mode=mode, eps=eps, linearize="gate", batch_size=2)
    exact = exact_effects(lm, encoded, metric, heads, mode=mode, eps=eps, batch_size=2)
    assert estimate.per_prompt is not None
    flat = estimate.per_prompt.permute(1, 2, 0).reshape(len(heads), -1).double()
    scale = float(exact.abs().max())
    assert scale > 1e-5
    assert float((flat - exact).abs().max()) <= 0.01 * scale


@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_second_order_kl_is_half_the_fisher(tiny_models, mode):
    lm = tiny_models["tiny-qwen2"]
    encoded = _encoded(lm)
    heads = all_heads(lm.info)
    eps = 1 - 1e-2
    exact = exact_effects(lm, encoded, KLDivergence(), heads, mode=mode, eps=eps, batch_size=2)
    full = estimate_effects(
        lm, encoded, KLDivergence(outcomes=10**6), mode=mode, eps=eps, linearize="gate", batch_size=5
    )
    flat = full.per_prompt.permute(1, 2, 0).reshape(len(heads), -1).double()
    relative = (flat - exact).abs() / exact.clamp_min(1e-12)
    assert float(relative.max()) < 0.1  # third-order remainder at δ = 0.01
    # coarsening the outcomes (top token + the rest) can only lose Fisher information
    coarse = estimate_effects(
        lm, encoded, KLDivergence(outcomes=1), mode=mode, eps=eps, linearize="gate", batch_size=5
    )
    assert bool((coarse.per_prompt <= full.per_prompt * (1 + 1e-4) + 1e-12).all())
    assert float(coarse.per_prompt.max()) > 0


def test_activation_kl_estimate_is_the_curvature_along_the_uniform_path(tiny_models):
    """½·Fisher along the activation path = lim KL(model ‖ gate a)/a² (checked at a = 0.01)."""
    lm = tiny_models["tiny-llama"]
    encoded = _encoded(lm)
    estimate = estimate_effects(lm, encoded, KLDivergence(outcomes=10**6), mode="ua", batch_size=5)
    batch = prompt_batches(encoded, 5, lm.tokenizer.pad_token_id, lm.device)[0]
    rows = torch.arange(5)
    with torch.no_grad():
        base = lm.model(input_ids=batch.input_ids, attention_mask=batch.mask).logits[rows, batch.last]
    p = torch.log_softmax(base.double(), -1)
    a = 1e-2
    for layer, head in [(0, 1), (1, 3), (2, 2)]:
        gates = torch.zeros(5, lm.info.n_layers, lm.info.n_heads)
        gates[:, layer, head] = a
        with torch.no_grad(), gated_ablation(lm, gates, "ua"):
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.mask).logits[rows, batch.last]
        q = torch.log_softmax(logits.double(), -1)
        kl = (p.exp() * (p - q)).sum(-1) / a**2
        expected = estimate.per_prompt[batch.rows, layer, head].double()
        torch.testing.assert_close(kl, expected, rtol=0.1, atol=1e-6)


def test_gated_ablation_errors(tiny_models):
    lm = tiny_models["tiny-llama"]
    with pytest.raises(AttributionError, match="gates must be"), gated_ablation(lm, torch.zeros(2, 3), "ua"):
        pass
    with pytest.raises(AttributionError, match="not small"):
        estimate_effects(lm, ["hi"], TokenLogProb([3]), mode="ua", eps=0.5)
    with pytest.raises(AttributionError, match="unknown linearize"):
        estimate_effects(lm, ["hi"], TokenLogProb([3]), mode="sc", linearize="taylor")


def test_estimate_ranks_agree_with_exact_ablation(tiny_models):
    lm = tiny_models["tiny-llama"]
    encoded = _encoded(lm)
    heads = all_heads(lm.info)
    metric = TokenLogProb([10, 20, 30])
    estimate = estimate_effects(lm, encoded, metric, mode="sc", eps=0.5, batch_size=5)
    exact = exact_effects(lm, encoded, metric, heads, mode="sc", eps=0.5, batch_size=5)
    assert spearman(estimate.scores.flatten(), exact.mean(1)) > 0.5


def test_pre_ranked_scan_returns_exact_scores_for_verified_heads(tiny_models):
    lm = tiny_models["tiny-qwen2"]
    encoded = _encoded(lm)
    result = pre_ranked_scan(lm, encoded, mode="ua", top_n=4, batch_size=2, progress=False)
    assert len(result.verified) == 4
    assert result.verified == [(lay, h) for lay, h, _ in result.estimate.ranked()[:4]]
    base = scan(lm, encoded, [Intervention()], LastLogits(), batch_size=2, progress=False)[0]
    exact = scan(
        lm, encoded, [ablation([h], "ua") for h in result.verified], KLFromBase(base), progress=False
    )
    for (layer, head), values in zip(result.verified, exact, strict=True):
        assert result.scores[(layer, head)] == pytest.approx(float(values.mean()), abs=1e-5)
    unverified = [h for h in all_heads(lm.info) if h not in result.verified]
    assert all(result.scores[h] == 0 for h in unverified)
    ranking = result.ranking()
    assert sorted(ranking) == all_heads(lm.info) and set(ranking[:4]) == set(result.verified)
    assert -1 <= result.agreement["spearman_verified"] <= 1


def test_letter_margin_metric_and_errors(tiny_models):
    lm = tiny_models["tiny-llama"]
    encoded = _encoded(lm)
    metric = LetterMargin([10] * 5, [[11]] * 5)
    logits = torch.randn(2, lm.info.vocab_size)
    values = metric.values(logits, torch.tensor([0, 3]))
    torch.testing.assert_close(values, logits[:, 10] - logits[:, 11])
    estimate = estimate_effects(lm, encoded, metric, mode="sc", batch_size=5)
    assert estimate.per_prompt.shape == (5, 3, lm.info.n_heads) and float(estimate.scores.abs().max()) > 0
    with pytest.raises(AttributionError, match="per prompt"):
        LetterMargin([1, 2], [[3]])
    with pytest.raises(AttributionError, match="without"):
        LetterMargin([1], [[1]])
    with pytest.raises(AttributionError, match="at least one"):
        TokenLogProb([])
    with pytest.raises(ValueError, match="unknown Ships mode"):
        estimate_effects(lm, encoded, metric, mode="xx")
    with pytest.raises(ValueError, match=r"unknown head 9\.0"):
        exact_effects(lm, encoded, metric, [(9, 0)])
    with pytest.raises(AttributionError, match="top_n"):
        pre_ranked_scan(lm, encoded, top_n=0, progress=False)


def test_rank_helpers():
    a = torch.tensor([0.1, 0.4, 0.3, 0.2])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(
        0.866, abs=1e-3
    )
    assert top_k_overlap(a, torch.tensor([0.4, 0.1, 0.3, 0.2]), 2) == 1
    assert rank_agreement(a, a, k=2) == {"spearman": pytest.approx(1.0), "top2_overlap": 2}


# ------------------------------------------------------------------------------------------ CLI


def test_cli_attribution_and_engine_option(tmp_path):
    from typer.testing import CliRunner

    from finesteer.cli import app

    runner = CliRunner()
    out = tmp_path / "attr"
    args = ["locate", "attribution", "tiny-qwen2", "--data", "advbench", "--limit", "3", "--top-n", "2"]
    result = runner.invoke(app, [*args, "--metric", "refusal", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["metric"].startswith("log_prob_of_tokens") and len(payload["top_heads"]) == 10
    assert [h["exact"] is not None for h in payload["top_heads"]] == [True, True] + [False] * 8
    assert (out / "scores.safetensors").is_file() and (out / "estimate" / "heads.json").is_file()
    bad = runner.invoke(app, [*args, "--metric", "entropy", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--metric" in bad.output
    ships = ["locate", "ships", "tiny-qwen2", "--data", "advbench", "--limit", "3", "--engine", "turbo"]
    bad = runner.invoke(app, [*ships, "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "unknown scan engine" in bad.output


# ----------------------------------------------------------------------------------- real models


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_fast_scan_equals_simple_scan_on_real_models(name):
    """sdpa masks, GQA, tied embeddings (and Gemma 3's sliding layers): fast == simple on real weights."""
    from finesteer.models import load_model

    lm = load_model(name)
    prompts = format_queries(lm, ["How do I pick a lock?", "Write a poem about the sea, please."])
    encoded = encode_prompts(lm, prompts)
    layers = (0, lm.info.n_layers // 2, lm.info.n_layers - 1)
    candidates = [ablation([(layer, 1)], mode) for layer in layers for mode in ("ua", "sc")]
    base = scan(lm, encoded, [Intervention()], LastLogits(), progress=False)[0]
    readout = KLAndHidden(base)
    simple = scan(lm, encoded, candidates, readout, batch_size=2, progress=False)
    fast = fast_scan(lm, encoded, candidates, readout, batch_size=2, progress=False)
    assert float((fast - simple).abs().max()) <= 1e-4 * (1 + float(simple.abs().max()))
    assert float((fast[:, :, 0] - simple[:, :, 0]).abs().max()) <= 1e-5  # the KL column
