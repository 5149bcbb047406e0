"""Certified head ranking: the estimate is exact where linearisation is, adaptive verification stops where
its documented rule says, and the bound is the documented formula."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from scipy import stats

from finesteer.locate.attribution.certify import (
    AttributionError,
    Calibration,
    adaptive_verification,
    miss_bound,
)
from finesteer.locate.attribution.metrics import KLDivergence, LetterMargin, TokenLogProb
from finesteer.locate.attribution.prerank import (
    certified_scan,
    estimate_effects,
    exact_effects,
    pre_ranked_scan,
)
from finesteer.locate.engine import encode_prompts
from finesteer.locate.ships import all_heads, format_queries
from finesteer.models import LoadedModel

QUERIES = ("how do I make a weapon", "hello there, friend", "tell me a secret now please")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Zero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _one_layer_linear(lm: LoadedModel) -> LoadedModel:
    """The tiny llama cut to one attention layer, its MLP and final norm removed: the logits are affine
    in every head's output, so attribution's linearisation is exact."""
    model = copy.deepcopy(lm.model)
    model.model.layers = model.model.layers[:1]
    model.model.layers[0].mlp = _Zero()
    model.config.num_hidden_layers = 1
    model.model.norm = torch.nn.Identity()
    info = dataclasses.replace(lm.info, n_layers=1)
    return dataclasses.replace(lm, model=model, info=info, fingerprint=lm.fingerprint + "-1layer")


@pytest.mark.parametrize("mode", ["sc", "ua"])
def test_estimate_is_exact_on_a_one_layer_model_with_a_linear_metric(tiny_models, mode):
    lm = _one_layer_linear(tiny_models["tiny-llama"])
    encoded = encode_prompts(lm, format_queries(lm, QUERIES))
    metric = LetterMargin([10, 20, 30], [[11], [21], [31]])  # a logit difference: linear in the logits
    estimate = estimate_effects(lm, encoded, metric, mode=mode, batch_size=2)
    heads = all_heads(lm.info)
    exact = exact_effects(lm, encoded, metric, heads, mode=mode, batch_size=2)
    assert float(exact.abs().max()) > 1e-3  # the heads do move the metric
    # ua's activation estimate takes ε → 0, the exact scan uses ε = 1e-5: equal up to that
    torch.testing.assert_close(estimate.per_prompt.flatten(1).T.double(), exact, atol=2e-4, rtol=1e-4)


def test_kl_estimate_is_the_local_second_order_term(tiny_models):
    lm = _one_layer_linear(tiny_models["tiny-llama"])
    encoded = encode_prompts(lm, format_queries(lm, QUERIES))
    estimate = estimate_effects(lm, encoded, KLDivergence(outcomes=lm.info.vocab_size), mode="sc")
    # Scaling a head's output by ε = 1 − δ is the gate at a = δ; KL ≈ ½ F δ² for small δ
    delta = 1e-2
    exact = exact_effects(lm, encoded, KLDivergence(), all_heads(lm.info), mode="sc", eps=1 - delta)
    torch.testing.assert_close(
        (exact / delta**2).T.float(), estimate.per_prompt.flatten(1), rtol=5e-2, atol=1e-6
    )


def _table(n: int = 40, noise: float = 0.1) -> tuple[list[float], list[float]]:
    """Estimates falling geometrically and exact values off by a factor exp(±noise)."""
    estimate = [2.0 ** (-i / 2) for i in range(n)]
    exact = [e * math.exp(noise if i % 2 else -noise) for i, e in enumerate(estimate)]
    return estimate, exact


def _verifier(exact: list[float], calls: list[list[int]]):
    def verify(indices: list[int]) -> torch.Tensor:
        calls.append(list(indices))
        return torch.tensor([exact[i] for i in indices])

    return verify


def test_adaptive_verification_stops_where_the_rule_says():
    estimate, exact = _table()
    k, confidence, step = 3, 0.99, 1
    calls: list[list[int]] = []
    cert = adaptive_verification(
        estimate, _verifier(exact, calls), k, confidence=confidence, step=step, sample=0
    )
    # the documented rule, recomputed independently: after m heads (m ≥ k), stop iff
    # log e_m + μ + t_{c,m−1}·s·√(1+1/m) < log T_k
    stop = None
    for m in range(k, len(estimate)):
        r = [math.log(exact[i]) - math.log(estimate[i]) for i in range(m)]
        mu = sum(r) / m
        sd = math.sqrt(sum((x - mu) ** 2 for x in r) / (m - 1))
        upper = math.log(estimate[m]) + mu + stats.t.ppf(confidence, m - 1) * sd * math.sqrt(1 + 1 / m)
        if upper < math.log(sorted(exact[:m], reverse=True)[k - 1]):
            stop = m
            break
    assert stop is not None and k < stop < len(estimate) - 5
    assert cert.order == list(range(stop)) and cert.bound.stopped == "margin"
    assert cert.bound.n_unverified == len(estimate) - stop
    assert calls[0] == list(range(k)) and all(len(c) == step for c in calls[1:])


def test_a_sampled_hit_resumes_verification_and_the_budget_stops_it():
    estimate, exact = _table()
    exact[35] = 100.0  # a head the estimate misses entirely
    calls: list[list[int]] = []
    cert = adaptive_verification(
        estimate, _verifier(exact, calls), 3, sample=len(estimate), generator=torch.Generator().manual_seed(0)
    )
    assert 35 in cert.exact and 35 in cert.sampled and cert.bound.sample_hits >= 1
    assert len(cert.exact) == len(estimate) and cert.bound.stopped == "all" and cert.bound.p == 0.0
    noisy = _table(noise=2.0)[1]
    capped = adaptive_verification(estimate, _verifier(noisy, []), 3, sample=0, max_verify=5)
    assert len(capped.order) == 5 and capped.bound.stopped == "budget"
    with pytest.raises(AttributionError, match="max_verify"):
        adaptive_verification(estimate, _verifier(exact, []), 3, max_verify=2)
    with pytest.raises(AttributionError, match="confidence"):
        adaptive_verification(estimate, _verifier(exact, []), 3, confidence=1.0)


def test_bound_is_the_documented_formula():
    estimate = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    verified = {0: 6.0, 1: 3.0, 2: 3.5, 3: 1.5}
    bound = miss_bound(estimate, verified, 2, space="log", sampled=[3])
    r = [math.log(verified[i] / estimate[i]) for i in verified]
    n, mu = len(r), sum(r) / len(r)
    scale = math.sqrt(sum((x - mu) ** 2 for x in r) / (n - 1)) * math.sqrt(1 + 1 / n)
    threshold = 3.5  # second best verified
    q = [stats.t.sf((math.log(threshold) - math.log(estimate[j]) - mu) / scale, n - 1) for j in (4, 5, 6)]
    expected = 1 - math.prod(1 - x for x in q)
    assert bound.threshold == threshold and bound.n_unverified == 3
    assert bound.p == pytest.approx(expected, rel=1e-9)
    assert bound.sample_size == 1 and bound.sample_hits == 0  # 1.5 does not beat the 2nd best of the others
    assert (
        "heads not verified: 3; estimated probability that one of them belongs in the top-2" in bound.line()
    )
    linear = miss_bound([1.0, -1.0, 0.0], {0: 2.0, 1: -0.5}, 1, space="linear")
    cal = Calibration.fit([1.0, -1.0], [2.0, -0.5], "linear")
    assert linear.p == pytest.approx(cal.exceed(0.0, 2.0))
    assert cal.mu == pytest.approx(0.75) and cal.sd == pytest.approx(math.sqrt(0.125))


def test_certified_scan_verifies_the_top_k_and_carries_the_bound(tiny_models):
    lm = tiny_models["tiny-qwen2"]
    encoded = encode_prompts(lm, format_queries(lm, QUERIES))
    result = certified_scan(lm, encoded, k=3, sample=2, step=2, batch_size=2, progress=False)
    assert result.bound is not None and len(result.verified) >= 3
    assert result.bound.n_unverified == len(all_heads(lm.info)) - len(result.verified)
    assert result.scores.extra["bound"]["heads_not_verified"] == result.bound.n_unverified
    # the rounds share one recorded prefix (PrefixCache): same numbers as a fresh exact scan
    fresh = exact_effects(lm, encoded, KLDivergence(), result.verified, batch_size=2)
    torch.testing.assert_close(result.exact.double(), fresh, atol=1e-5, rtol=1e-5)
    fixed = pre_ranked_scan(lm, encoded, top_n=4, batch_size=2, progress=False)
    assert fixed.bound is not None and fixed.bound.n_unverified == len(all_heads(lm.info)) - 4
    assert 0.0 <= fixed.bound.p <= 1.0


@pytest.mark.parametrize("kind", ["refusal", "letters"])
def test_certified_scan_runs_the_same_loop_for_first_order_metrics(tiny_models, kind):
    lm = tiny_models["tiny-llama"]
    encoded = encode_prompts(lm, format_queries(lm, QUERIES))
    refusal = TokenLogProb([5, 7, 9])
    metric = refusal if kind == "refusal" else LetterMargin([10, 20, 30], [[11], [21], [31]])
    result = certified_scan(
        lm, encoded, metric, k=3, step=2, sample=1, mode="sc", batch_size=2, progress=False
    )
    assert result.bound is not None and result.bound.calibration.space == "linear"
    exact = exact_effects(lm, encoded, metric, result.verified, mode="sc", batch_size=2)
    torch.testing.assert_close(result.exact.double(), exact, atol=1e-5, rtol=1e-5)
    assert result.ranking()[:3] == sorted(result.verified, key=lambda h: -result.scores[h])[:3]


def test_ab_inputs_read_the_scorers_letter_margin_in_both_orders(tiny_models):
    """The A/B attribution inputs are the scorer's own sequences: at the unmodified model the metric
    equals log p(matching) − log p(other) of `ABScorer`'s option probabilities, and each item comes
    with its mirror (matching letter swapped)."""
    from finesteer.data import load_dataset
    from finesteer.data.balance import letter_balanced
    from finesteer.locate.attribution.ab_inputs import ab_attribution_inputs
    from finesteer.scoring.ab import ABScorer

    lm = tiny_models["tiny-llama"]
    items = load_dataset("coordinate-other-ais", "test_ab", limit=3)
    encoded, metric, ids = ab_attribution_inputs(lm, items)
    assert ids == [i for item in items for i in (item.id, item.id + "~swap")]
    assert len(encoded) == 6 and metric.key() == "letter_margin:6"
    assert all(metric.matching[2 * i] != metric.matching[2 * i + 1] for i in range(3))
    values = []
    for row, tokens in enumerate(encoded.ids):
        with torch.no_grad():
            logits = lm.model(torch.tensor([tokens])).logits[:, -1]
        values.append(float(metric.values(logits, torch.tensor([row]))[0]))
    p = ABScorer(lm, letter_balanced(items)).score([None]).p_matching[0]
    expected = torch.log(p) - torch.log1p(-p)
    assert torch.allclose(torch.tensor(values), expected.float(), atol=1e-4)


def test_cli_attribution_ab_metric_prints_the_bound(tmp_path):
    import json

    from typer.testing import CliRunner

    from finesteer.cli import app

    out = tmp_path / "ab"
    args = ["locate", "attribution", "tiny-llama", "--data", "coordinate-other-ais", "--limit", "3",
            "--metric", "ab", "--confidence", "0.9", "--certify-top", "3",
            "--out", str(out), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["metric"] == "letter_margin:6" and payload["n_prompts"] == 6
    assert "estimated probability that one of them belongs in the top-3" in " ".join(result.stderr.split())
    bad = CliRunner().invoke(app, [*args[:-3], "--confidence", "1.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--confidence" in bad.output
    prompts = CliRunner().invoke(app, [*args[:4], "advbench", *args[5:-2], str(tmp_path / "y")])
    assert prompts.exit_code == 2 and "A/B" in prompts.output
