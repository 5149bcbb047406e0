"""Statistics on constructed data: intervals cover at their stated rate, null effects are called
"no reliable effect", planted effects are found, and selection over a sweep is paid for."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from finesteer.errors import FinesteerError
from finesteer.evaluate.ab import ABResult
from finesteer.evaluate.ab_paired import ab_effect_vs, ab_effect_vs_controls
from finesteer.evaluate.effect_verdict import (
    NO_RELIABLE_EFFECT,
    RELIABLE_EFFECT,
    WRONG_DIRECTION,
    best_of_sweep_null,
    effect_verdict,
)
from finesteer.evaluate.resampling import cluster_sums, sign_flip_test
from finesteer.evaluate.scores import wilson_interval
from finesteer.evaluate.stats import (
    Estimate,
    StatsError,
    anti_steerable_fraction,
    benjamini_hochberg,
    holm,
    mean_estimate,
    paired_effect,
    rate_estimate,
    seed_spread,
)

SIMS = 400


def _strict_json(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# Coverage: the 95% interval holds the true value about 95% of the time
# --------------------------------------------------------------------------------------------------


def test_wilson_rate_interval_covers_at_its_stated_rate() -> None:
    rng = np.random.default_rng(1)
    p, n = 0.3, 60
    counts = rng.binomial(n, p, size=SIMS)
    hits = [rate_estimate(int(c), n).low <= p <= rate_estimate(int(c), n).high for c in counts]
    assert 0.92 <= np.mean(hits) <= 0.98


def test_bootstrap_mean_interval_covers_at_its_stated_rate() -> None:
    rng = np.random.default_rng(2)
    a, b, n = 2.0, 5.0, 60  # Beta(2, 5): a skewed p(matching)-like distribution, mean 2/7
    truth = a / (a + b)
    hits = 0
    for _ in range(SIMS):
        est = mean_estimate(rng.beta(a, b, size=n), n_resamples=1000, seed=rng)
        hits += est.low <= truth <= est.high
    assert 0.92 <= hits / SIMS <= 0.98


def test_paired_bootstrap_interval_covers_the_true_difference() -> None:
    rng = np.random.default_rng(3)
    n, shift = 50, 0.1
    hits = 0
    for _ in range(SIMS):
        base = rng.beta(2, 2, size=n)
        steered = base + shift + rng.normal(0, 0.15, size=n)
        effect = paired_effect(steered, base, binary=False, n_resamples=1000, seed=rng)
        hits += effect.low <= shift <= effect.high
    assert 0.92 <= hits / SIMS <= 0.98


# --------------------------------------------------------------------------------------------------
# Verdicts: a null control is "no reliable effect", a planted effect is found
# --------------------------------------------------------------------------------------------------


def test_zero_effect_control_is_no_reliable_effect_at_most_five_percent_of_the_time() -> None:
    rng = np.random.default_rng(4)
    n = 80
    labels_binary, labels_continuous = [], []
    for _ in range(SIMS):
        method, control = rng.binomial(1, 0.5, n), rng.binomial(1, 0.5, n)
        labels_binary.append(effect_verdict(paired_effect(method, control, n_resamples=500, seed=rng)).label)
        method_p, control_p = rng.beta(2, 2, n), rng.beta(2, 2, n)
        effect = paired_effect(method_p, control_p, n_resamples=500, seed=rng)
        labels_continuous.append(effect_verdict(effect).label)
    for labels in (labels_binary, labels_continuous):
        assert labels.count(RELIABLE_EFFECT) / SIMS <= 0.05
        assert labels.count(NO_RELIABLE_EFFECT) / SIMS >= 0.9


def test_a_planted_effect_is_found_and_a_reversed_one_is_called_wrong_direction() -> None:
    rng = np.random.default_rng(5)
    n = 100
    control = rng.binomial(1, 0.4, n).astype(float)
    method = np.where(rng.random(n) < 0.4, 1.0, control)  # ~+0.24 planted
    effect = paired_effect(method, control)
    assert effect.test == "exact-mcnemar" and effect.details["n_lost"] == 0
    verdict = effect_verdict(effect)
    assert verdict.label == RELIABLE_EFFECT and verdict.reliable and effect.low > 0
    assert effect_verdict(paired_effect(control, method)).label == WRONG_DIRECTION
    # steering meant to lower the score: the same drop is the intended effect
    assert effect_verdict(paired_effect(control, method), direction=-1).label == RELIABLE_EFFECT


def test_verdict_takes_the_larger_of_the_adjusted_and_selection_p_values() -> None:
    effect = paired_effect(np.full(30, 1.0), np.zeros(30))
    assert effect_verdict(effect).label == RELIABLE_EFFECT
    assert effect_verdict(effect, adjusted_p=0.2).label == NO_RELIABLE_EFFECT
    verdict = effect_verdict(effect, selection_p=0.3)
    assert verdict.label == NO_RELIABLE_EFFECT and verdict.p_value == 0.3
    assert any("0.3" in reason for reason in verdict.reasons)
    assert "interval" in verdict.rule and verdict.to_dict()["verdict"] == NO_RELIABLE_EFFECT


# --------------------------------------------------------------------------------------------------
# Tests and estimates, exactly
# --------------------------------------------------------------------------------------------------


def test_rate_estimate_matches_the_wilson_interval_and_gives_exact_on_request() -> None:
    est = rate_estimate(7, 20)
    assert (est.value, est.n, est.method) == (0.35, 20, "wilson")
    assert (est.low, est.high) == pytest.approx(wilson_interval(7, 20), abs=1e-12)
    exact = rate_estimate(7, 20, method="exact")
    assert exact.low < est.low and exact.high > est.high  # Clopper-Pearson is wider
    assert rate_estimate(0, 10).low == 0.0 and rate_estimate(10, 10).high == 1.0
    with pytest.raises(StatsError):
        rate_estimate(3, 2)
    with pytest.raises(FinesteerError):
        rate_estimate(1, 2, confidence=1.5)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs() -> None:
    treated = [1, 1, 1, 1, 1, 0, 1, 0]
    reference = [0, 0, 0, 0, 1, 1, 1, 0]
    effect = paired_effect(treated, reference)
    assert effect.details == {"n_discordant": 5, "n_gained": 4, "n_lost": 1}
    assert effect.p_value == pytest.approx(2 * (1 + 5) / 32)  # two-sided binomial, 4 of 5
    assert effect.difference == pytest.approx(3 / 8)
    assert paired_effect([1, 0], [1, 0]).p_value == 1.0  # no discordant pair


def test_sign_flip_test_is_exact_for_small_n() -> None:
    assert sign_flip_test(np.array([0.1, 0.2, 0.3])) == pytest.approx(2 / 8)
    assert sign_flip_test(np.array([0.1, 0.2, 0.3]), alternative="greater") == pytest.approx(1 / 8)
    assert sign_flip_test(np.array([0.1, 0.2, 0.3]), alternative="less") == pytest.approx(1.0)


def test_same_seed_same_numbers_and_no_global_seeding() -> None:
    x = np.random.default_rng(0).random(40)
    state = np.random.get_state()[1].copy()
    assert mean_estimate(x, seed=7) == mean_estimate(x, seed=7)
    assert mean_estimate(x, seed=7) != mean_estimate(x, seed=8)
    assert (np.random.get_state()[1] == state).all()


def test_to_dict_never_emits_nan() -> None:
    empty = rate_estimate(0, 0).to_dict()
    assert empty["value"] is None and empty["reason"] == "no items"
    _strict_json(empty)
    _strict_json(mean_estimate([]).to_dict())
    _strict_json(Estimate(0.5, 3, math.nan, math.inf).to_dict())
    effect = paired_effect([0.2, 0.4], [0.2, 0.4])
    _strict_json(effect.to_dict())
    _strict_json(effect_verdict(effect).to_dict())
    with pytest.raises(StatsError):
        mean_estimate([0.1, math.nan])


def test_holm_and_benjamini_hochberg() -> None:
    p = [0.01, 0.04, 0.03, 0.5]
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert benjamini_hochberg(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert holm([]) == [] and benjamini_hochberg([]) == []
    with pytest.raises(StatsError):
        holm([0.1, 1.2])


def test_seed_spread() -> None:
    spread = seed_spread([0.1, 0.2, 0.3])
    assert spread["n_seeds"] == 3 and spread["mean"] == pytest.approx(0.2)
    assert spread["std"] == pytest.approx(0.1) and (spread["min"], spread["max"]) == (0.1, 0.3)
    assert seed_spread([0.4])["std"] is None


# --------------------------------------------------------------------------------------------------
# Anti-steerability and the polarity split
# --------------------------------------------------------------------------------------------------


def test_anti_steerable_fraction_on_a_hand_made_example() -> None:
    before = [0.2, 0.5, 0.7, 0.4, 0.9]
    after = [0.6, 0.4, 0.7, 0.8, 0.3]  # items 1 and 4 moved down, item 2 did not move
    est = anti_steerable_fraction(before, after)
    assert (est.value, est.n) == (0.4, 5) and est.low < 0.4 < est.high
    assert anti_steerable_fraction(before, after, direction=-1).value == 0.4  # items 0 and 3 moved up
    assert anti_steerable_fraction(before, after, tolerance=0.2).value == 0.2
    noise = np.array(before) + np.array([-3e-8, 2e-8, -1e-7, 5e-8, -4e-8])  # float32 rounding, no change
    assert anti_steerable_fraction(before, noise).value == 0.0
    assert anti_steerable_fraction(before, noise, tolerance=0.0).value == 0.6
    with pytest.raises(StatsError):
        anti_steerable_fraction(before, after[:3])


def _result(rows: list[tuple[str, str, bool, float]]) -> ABResult:
    records = [
        {"id": i, "matching_polarity": pol, "is_matching": m, "p_matching": p} for i, pol, m, p in rows
    ]
    count = sum(m for _, _, m, _ in rows)
    return ABResult(len(rows), count / len(rows), count, float(np.mean([r[3] for r in rows])), records)


def test_ab_effect_vs_pairs_by_id_and_splits_by_polarity() -> None:
    # a "say Yes" edit: Yes-matching items gain, No-matching items lose
    base = _result([("a", "yes", False, 0.4), ("b", "yes", False, 0.3), ("c", "no", True, 0.7),
                    ("d", "no", True, 0.6), ("e", "other", False, 0.5)])  # fmt: skip
    steered = _result([("e", "other", False, 0.5), ("d", "no", False, 0.2), ("c", "no", False, 0.3),
                       ("b", "yes", True, 0.9), ("a", "yes", True, 0.8)])  # fmt: skip
    comparison = ab_effect_vs(base, steered)
    assert comparison.n == 5
    assert comparison.matching.difference == 0.0 and comparison.matching.details["n_discordant"] == 4
    assert comparison.p_matching is not None
    assert comparison.p_matching.difference == pytest.approx(0.04)  # (.4 + .6 - .4 - .4) / 5
    assert comparison.anti_steerable is not None and comparison.anti_steerable.value == 0.4
    split = comparison.by_polarity
    assert split["yes"]["delta_matching_rate"] == 1.0 and split["no"]["delta_matching_rate"] == -1.0
    assert split["yes"]["anti_steerable_fraction"]["value"] == 0.0
    assert split["no"]["anti_steerable_fraction"]["value"] == 1.0
    assert split["other"]["n"] == 1 and split["other"]["delta_matching_rate"] == 0.0
    _strict_json(comparison.to_dict())
    with pytest.raises(StatsError, match="different items"):
        ab_effect_vs(base, _result([("a", "yes", True, 0.9)]))


def test_ab_result_to_dict_gains_intervals_and_keeps_its_keys() -> None:
    base = _result([("a", "yes", False, 0.4), ("b", "yes", True, 0.8), ("c", "no", True, 0.7)])
    out = base.to_dict()
    assert {"method", "n", "matching_rate", "count", "ci95", "mean_p_matching", "per_item"} <= set(out)
    interval = out["interval"]
    assert interval["matching_rate"]["n"] == 3 and interval["matching_rate"]["method"] == "wilson"
    assert interval["matching_rate"]["low"] == pytest.approx(out["ci95"][0])
    assert interval["mean_p_matching"]["value"] == pytest.approx(0.6333333)
    assert interval["mean_p_matching"]["method"] == "bootstrap-percentile"
    generated = ABResult(0, math.nan, 0, None, [], method="generate:hsi").to_dict()
    assert generated["interval"]["mean_p_matching"] is None
    assert generated["interval"]["matching_rate"]["reason"] == "no items"


# --------------------------------------------------------------------------------------------------
# Best of a sweep
# --------------------------------------------------------------------------------------------------


def test_best_of_sweep_null_is_larger_than_the_naive_p_value_of_the_same_best() -> None:
    rng = np.random.default_rng(6)
    n_configs, n = 40, 60
    control = rng.beta(2, 2, n)
    sweep = control + rng.normal(0, 0.2, (n_configs, n))  # no configuration does anything
    null = best_of_sweep_null(sweep, control, labels=[f"cfg{i}" for i in range(n_configs)])
    naive = sign_flip_test(sweep[null.best_index] - control, alternative="greater")
    assert null.best_label == f"cfg{null.best_index}"
    assert null.naive_p_value == pytest.approx(naive, abs=0.03)
    assert null.p_value > null.naive_p_value and null.p_value > 0.05
    assert null.naive_p_value < 0.2  # the winner's curse: alone it looks promising
    _strict_json(null.to_dict())


def test_best_of_sweep_null_is_calibrated_and_finds_a_planted_configuration() -> None:
    rng = np.random.default_rng(7)
    n_configs, n, sims = 20, 40, 150
    rejections = naive_rejections = 0
    for _ in range(sims):
        d = rng.normal(0, 1, (n_configs, n))
        null = best_of_sweep_null(d, np.zeros(n), n_resamples=400, seed=rng)
        rejections += null.p_value < 0.05
        naive_rejections += null.naive_p_value < 0.05
    assert rejections / sims <= 0.09
    assert naive_rejections / sims >= 0.3  # picking the best of 20 and testing it alone is badly biased
    d = rng.normal(0, 1, (n_configs, n))
    d[3] += 1.0
    found = best_of_sweep_null(d, np.zeros(n), statistic="t")
    assert found.best_index == 3 and found.p_value < 0.01
    lowered = best_of_sweep_null(-d, np.zeros(n), direction=-1)
    assert lowered.best_index == 3 and lowered.p_value < 0.01


def test_best_of_sweep_null_checks_its_input() -> None:
    with pytest.raises(StatsError):
        best_of_sweep_null(np.zeros((3, 5)), np.zeros(4))
    with pytest.raises(StatsError):
        best_of_sweep_null(np.zeros(5), np.zeros(5))
    with pytest.raises(StatsError):
        best_of_sweep_null(np.zeros((2, 5)), np.zeros(5), labels=["only one"])


# --------------------------------------------------------------------------------------------------
# Clusters: a question and its option-swapped mirror count once
# --------------------------------------------------------------------------------------------------


def test_cluster_bootstrap_of_duplicated_items_equals_the_bootstrap_of_the_originals() -> None:
    x = np.random.default_rng(8).random(25)
    doubled, clusters = np.repeat(x, 2), [f"q{i}" for i in range(25) for _ in range(2)]
    sums, counts = cluster_sums(doubled, clusters)
    assert sums == pytest.approx(2 * x) and (counts == 2).all()
    once, twice = mean_estimate(x, seed=3), mean_estimate(doubled, seed=3, clusters=clusters)
    assert (twice.low, twice.high) == pytest.approx((once.low, once.high))
    assert twice.n == 50 and twice.method == "cluster-bootstrap-percentile"
    naive = mean_estimate(doubled, seed=3)
    assert naive.high - naive.low < 0.85 * (twice.high - twice.low)  # treating copies as new data
    with pytest.raises(StatsError):
        mean_estimate(x, clusters=clusters)


def test_cluster_intervals_cover_when_mirrored_items_are_correlated() -> None:
    rng = np.random.default_rng(9)
    k, shift = 30, 0.05
    clusters = [i for i in range(k) for _ in range(2)]
    hits_cluster = hits_naive = 0
    for _ in range(SIMS):
        question = np.repeat(rng.normal(0, 0.3, k), 2)  # each question's own effect, shared by its mirror
        d = shift + question + rng.normal(0, 0.05, 2 * k)
        with_clusters = paired_effect(d, np.zeros(2 * k), n_resamples=500, seed=rng, clusters=clusters)
        naive = paired_effect(d, np.zeros(2 * k), n_resamples=500, seed=rng)
        hits_cluster += with_clusters.low <= shift <= with_clusters.high
        hits_naive += naive.low <= shift <= naive.high
    assert 0.92 <= hits_cluster / SIMS <= 0.98
    assert hits_naive / SIMS < 0.9


def test_ab_effect_vs_resamples_an_item_and_its_mirror_together() -> None:
    rows = [("q1", "yes", False, 0.4), ("q1~swap", "yes", True, 0.6), ("q2", "no", True, 0.7),
            ("q2~swap", "no", False, 0.3)]  # fmt: skip
    after = [(i, pol, not m, 1 - p) for i, pol, m, p in rows]
    comparison = ab_effect_vs(_result(rows), _result(after))
    assert comparison.matching.test == "cluster-sign-flip-permutation"
    assert comparison.matching.details["n_clusters"] == 2
    assert comparison.p_matching is not None and comparison.p_matching.details["n_clusters"] == 2
    assert comparison.matching.to_dict()["interval_method"] == "paired-cluster-bootstrap-percentile"
    interval = _result(rows).to_dict()["interval"]["mean_p_matching"]
    assert interval["method"] == "cluster-bootstrap-percentile"


def test_best_of_sweep_null_flips_clusters_together() -> None:
    d = np.random.default_rng(10).normal(0.1, 1, (8, 20))
    once = best_of_sweep_null(d, np.zeros(20), seed=4)
    clusters = [i for i in range(20) for _ in range(2)]
    twice = best_of_sweep_null(np.repeat(d, 2, axis=1), np.zeros(40), seed=4, clusters=clusters)
    assert twice.best_index == once.best_index and twice.p_value == pytest.approx(once.p_value)
    assert best_of_sweep_null(np.repeat(d, 2, axis=1), np.zeros(40), seed=4).p_value < once.p_value


def test_ab_effect_vs_controls_pairs_against_the_mean_control() -> None:
    method = _result([("a", "yes", True, 0.9), ("b", "no", True, 0.8), ("c", "no", False, 0.4)])
    controls = [
        _result([("c", "no", False, 0.4), ("b", "no", False, 0.4), ("a", "yes", True, 0.6)]),
        _result([("a", "yes", False, 0.3), ("b", "no", True, 0.6), ("c", "no", False, 0.2)]),
        _result([("a", "yes", True, 0.6), ("b", "no", False, 0.2), ("c", "no", True, 0.6)]),
    ]
    comparison = ab_effect_vs_controls(controls, method)
    assert (comparison.n, comparison.n_seeds) == (3, 3)
    # per-item control means: a 2/3, b 1/3, c 1/3 → method − control = (1/3 + 2/3 − 1/3) / 3
    assert comparison.matching.difference == pytest.approx(2 / 9)
    assert comparison.matching.test == "sign-flip-permutation"
    assert comparison.p_matching is not None
    assert comparison.p_matching.difference == pytest.approx((0.4 + 0.4 - 0.0) / 3)
    spread = comparison.per_seed["delta_matching_rate"]
    assert spread["n_seeds"] == 3 and spread["mean"] == pytest.approx(2 / 9)
    _strict_json(comparison.to_dict())
    with pytest.raises(StatsError):
        ab_effect_vs_controls([], method)


def test_ab_effect_vs_pairs_by_position_when_both_list_the_same_ids() -> None:
    rows = [("x", "yes", False, 0.2), ("x", "no", True, 0.7)]  # a data file that repeats an id
    comparison = ab_effect_vs(_result(rows), _result([("x", "yes", True, 0.9), ("x", "no", True, 0.8)]))
    assert comparison.n == 2 and comparison.p_matching is not None
    assert comparison.p_matching.difference == pytest.approx(0.4)
    three = [*rows, ("y", "no", False, 0.1)]
    with pytest.raises(StatsError, match="twice"):
        ab_effect_vs(_result(three), _result(three[::-1]))
