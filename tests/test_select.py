"""Issue 14 (part B): selection that can say "no reliable effect", direction diagnostics, balanced
directions, polarity-aware selection and the letter-balanced defaults of HSI, ITI and CAA."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from finesteer.activations.diagnostics import direction_diagnostics, format_axes, project_out
from finesteer.activations.directions import HeadDirections, directions_from_activations
from finesteer.data.balance import contrast_row_factors, letter_balanced, option_polarity
from finesteer.data.items import ABItem
from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, RELIABLE_EFFECT
from finesteer.fit.caa import fit_caa_selection
from finesteer.fit.hsi import HSIConfig, fit_hsi_selection
from finesteer.fit.iti import fit_iti_selection
from finesteer.locate.hsi_table import HsiSweep
from finesteer.locate.selection import Candidate, SelectionEvidence, best_candidate, polarity_groups
from finesteer.methods.caa import CAASettings
from finesteer.methods.hsi import HSISettings
from finesteer.methods.iti import ITISettings
from finesteer.methods.verdict import selection_verdict, sweep_verdict
from finesteer.models import LoadedModel


def _item(i: int, matching: str, first: str = "Yes", second: str = "No") -> ABItem:
    other = "(B)" if matching == "(A)" else "(A)"
    return ABItem(f"Question {i}?\n\nChoices:\n (A) {first}\n (B) {second}", matching, other, str(i))


# --- direction diagnostics ------------------------------------------------------------------------


def test_diagnostics_equal_a_brute_force_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    n_items, sites, dim = 7, (2, 3), 5
    z = torch.randn(2 * n_items, *sites, dim, generator=gen, dtype=torch.float64)
    z[0::2] += 0.8  # matching rows shifted: some signal
    labels = [i % 2 == 0 for i in range(2 * n_items)]
    diag = direction_diagnostics(z, labels)
    assert diag.paired
    for layer, head in itertools.product(range(2), range(3)):
        pos = [z[2 * i, layer, head] for i in range(n_items)]
        neg = [z[2 * i + 1, layer, head] for i in range(n_items)]
        diffs = [p - q for p, q in zip(pos, neg, strict=True)]
        cos = []
        for i, d in enumerate(diffs):
            rest = sum(diffs[j] for j in range(n_items) if j != i) / (n_items - 1)
            cos.append(float(d @ rest / (d.norm() * rest.norm())))
        assert float(diag.consistency[layer, head]) == pytest.approx(np.mean(cos), abs=1e-6)
        scores_pos, scores_neg = [], []
        for test, fit in ((0, 1), (1, 0)):  # each half projected on the other half's direction
            axis = sum(pos[fit::2]) / len(pos[fit::2]) - sum(neg[fit::2]) / len(neg[fit::2])
            unit = axis / axis.norm()
            scores_pos += [float(x @ unit) for x in pos[test::2]]
            scores_neg += [float(x @ unit) for x in neg[test::2]]
        pooled = np.sqrt((np.var(scores_pos) + np.var(scores_neg)) / 2)
        expected = (np.mean(scores_pos) - np.mean(scores_neg)) / pooled
        assert float(diag.d_prime[layer, head]) == pytest.approx(expected, rel=1e-5)
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in scores_pos for q in scores_neg)
        assert float(diag.auroc[layer, head]) == pytest.approx(wins / n_items**2, abs=1e-6)


def test_diagnostics_flag_scattered_differences_and_survive_a_save(tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(40, 1, 2, 8, generator=gen)
    z[0::2, 0, 0] += torch.tensor([3.0] + [0.0] * 7)  # head 0.0: every item moves the same way
    labels = [i % 2 == 0 for i in range(40)]
    directions = directions_from_activations(z, labels)
    diag = directions.diagnostics
    assert diag is not None and not diag.is_low(0, 0) and diag.is_low(0, 1)
    assert len(diag.warnings([(0, 0), (0, 1)])) == 1
    loaded = HeadDirections.load(directions.save(tmp_path / "d.safetensors")).diagnostics
    assert loaded is not None and torch.equal(loaded.auroc, diag.auroc)


# --- balanced directions ----------------------------------------------------------------------------


def test_balanced_directions_have_no_letter_or_yes_component() -> None:
    """Matching answers are mostly "(A)" and mostly "Yes": the plain mean difference carries both the
    letter and the Yes axis; projected out, the direction has none of either and keeps the behaviour."""
    gen = torch.Generator().manual_seed(2)
    dim = 6
    behaviour, letter, yes = torch.eye(dim, dtype=torch.float64)[:3]
    items = [
        _item(i, "(A)" if i % 5 else "(B)", *(("Yes", "No") if i % 4 else ("No", "Yes"))) for i in range(40)
    ]
    labels = [r % 2 == 0 for r in range(80)]
    letters, polarities = contrast_row_factors(items)
    rows = []
    for label, let, pol in zip(labels, letters, polarities, strict=True):
        rows.append(
            1.0 * label * behaviour + 2.0 * (let == "A") * letter + 1.5 * (pol == "yes") * yes
            + 0.01 * torch.randn(dim, generator=gen, dtype=torch.float64)
        )  # fmt: skip
    z = torch.stack(rows)[:, None, None, :]  # [N, 1 layer, 1 head, dim]
    plain = directions_from_activations(z, labels).directions[0, 0].double()
    assert abs(float(plain @ letter)) > 0.2 and abs(float(plain @ yes)) > 0.2
    axes = format_axes(z, labels, letters, polarities)
    balanced = directions_from_activations(z, labels, remove=axes).directions[0, 0].double()
    for axis in axes[:, 0, 0]:
        assert abs(float(balanced @ axis)) < 1e-6 * float(axis.norm())
    assert abs(float(balanced @ letter)) < 0.02 and abs(float(balanced @ yes)) < 0.02
    assert float(balanced @ behaviour) > 0.99
    assert torch.allclose(project_out(balanced, axes[:, 0, 0]), balanced, atol=1e-6)


def test_contrast_rows_name_each_answer_letter_and_polarity() -> None:
    item = _item(0, "(B)", "Yes, always", "No")
    assert option_polarity(item, "A") == "yes" and option_polarity(item, "B") == "no"
    assert contrast_row_factors([item]) == (["B", "A"], ["no", "yes"])
    assert polarity_groups([item, _item(1, "(A)")]) == ["B|no/other", "A|yes"]


# --- selection that can say "nothing found" -----------------------------------------------------------


def _evidence(effect: float, n_configs: int = 12, n_items: int = 30, seed: int = 0) -> SelectionEvidence:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.7, n_items)
    control = base + rng.normal(0, 0.05, (n_configs, n_items))
    treated = base + rng.normal(0, 0.05, (n_configs, n_items))
    treated[3] += effect
    items = [_item(i, "(A)") for i in range(n_items // 2)]
    ids = [it.id for it in letter_balanced(items)]
    means = (treated - control).mean(axis=1)
    return SelectionEvidence(
        labels=[f"config {i}" for i in range(n_configs)],
        p_matching=torch.tensor(treated),
        matching=torch.tensor((treated > 0.5).astype(float)),
        baseline_p=torch.tensor(base),
        baseline_matching=torch.tensor((base > 0.5).astype(float)),
        item_ids=ids,
        polarities=["yes"] * (n_items - 6) + ["no"] * 6,
        chosen_index=int(np.argmax(means)),
        direction=1,
        control_p=torch.tensor(control),
        control_matching=torch.tensor((control > 0.5).astype(float)),
        control_seeds=(0, 1, 2),
        control_kind="random-heads",
    )


def test_a_zero_effect_sweep_says_no_reliable_effect() -> None:
    calls = [selection_verdict(_evidence(0.0, seed=s), n_resamples=500)["verdict"] for s in range(20)]
    assert calls.count(NO_RELIABLE_EFFECT) >= 18  # the best of 12 noisy configs is not an effect


def test_a_planted_effect_is_found() -> None:
    result = selection_verdict(_evidence(0.1), n_resamples=500)
    assert result["verdict"] == RELIABLE_EFFECT
    assert result["chosen"] == "config 3" and result["reference"] == "control"
    assert result["sweep"]["n_configs"] == 12 and result["effect"]["difference"] > 0.05


def test_choice_not_best_by_the_test_statistic_is_holm_adjusted() -> None:
    evidence = dataclasses.replace(_evidence(0.1), chosen_index=5)
    result = selection_verdict(evidence, n_resamples=500)
    assert result["holm_p"] is not None and result["verdict"] == NO_RELIABLE_EFFECT


def test_anti_steerable_fraction_and_polarity_split_on_a_hand_made_example() -> None:
    ids = ["a", "b", "c", "d", "e"]
    evidence = SelectionEvidence(
        labels=["only"],
        p_matching=torch.tensor([[0.9, 0.8, 0.7, 0.2, 0.5]], dtype=torch.float64),
        matching=torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]]),
        baseline_p=torch.tensor([0.5, 0.5, 0.5, 0.6, 0.6], dtype=torch.float64),
        baseline_matching=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]),
        item_ids=ids,
        polarities=["yes", "yes", "yes", "no", "other"],
        chosen_index=0,
        direction=1,
    )
    result = selection_verdict(evidence, n_resamples=200)
    assert result["reference"] == "unmodified"
    assert result["anti_steerable_fraction"]["value"] == pytest.approx(2 / 5)  # d and e moved down
    by = result["by_polarity"]
    assert by["yes"]["n"] == 3 and by["yes"]["delta_mean_p_matching"] == pytest.approx(0.3)
    assert by["yes"]["anti_steerable_fraction"]["value"] == 0.0
    assert by["no"]["delta_mean_p_matching"] == pytest.approx(-0.4)
    assert by["no"]["anti_steerable_fraction"]["value"] == 1.0
    assert by["other"]["delta_mean_p_matching"] == pytest.approx(-0.1)


def _sweep(per_item: torch.Tensor, baseline: torch.Tensor, groups: list[str]) -> HsiSweep:
    letters = [g.split("|")[0] for g in groups]
    ids = [str(i) for i in range(per_item.shape[-1])]
    rate = (per_item > 0.5).float().mean(-1)
    return HsiSweep((4.0,), per_item.mean(-1), rate, per_item, baseline, ids, letters, {}, groups)


def test_polarity_ranking_demotes_a_yes_head() -> None:
    groups = ["A|yes", "A|yes", "B|yes", "B|yes", "A|no/other", "B|no/other"]
    baseline = torch.full((6,), 0.5)
    per_item = torch.full((1, 2, 1, 6), 0.5)
    per_item[0, 0, 0] = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])  # a "Yes" head
    per_item[0, 1, 0] = torch.tensor([0.6, 0.6, 0.6, 0.6, 0.6, 0.6])  # helps every group a little
    sweep = _sweep(per_item, baseline, groups)
    assert sweep.ranked_heads("balanced")[0][:2] == (0, 0)
    assert sweep.ranked_heads("polarity")[0][:2] == (0, 1)
    assert sweep.gain("polarity")[0, 0] < 0
    yes = Candidate(1, 4.0, 0.9, 0.8, 0.9, 0.8, worst_group_gain=-0.2)
    even = Candidate(2, 4.0, 0.7, 0.6, 0.7, 0.6, worst_group_gain=0.1)
    assert best_candidate([yes, even]) is yes
    assert best_candidate([yes, even], criterion="polarity") is even


def test_sweep_verdict_of_a_sweep_where_nothing_works() -> None:
    gen = torch.Generator().manual_seed(3)
    baseline = torch.rand(20, generator=gen)
    per_item = baseline + 0.02 * torch.randn(2, 3, 1, 20, generator=gen)
    result = sweep_verdict(_sweep(per_item, baseline, ["A|yes"] * 20), n_resamples=300)
    assert result["verdict"] == NO_RELIABLE_EFFECT and result["n_candidates"] == 6


# --- letter-balanced defaults and the fits' evidence on a tiny model --------------------------------------


def test_methods_default_to_both_option_orders_and_controls() -> None:
    assert HSIConfig().balance_letters and HSISettings().balance_letters
    assert CAASettings().balance_letters and ITISettings().balance_letters
    assert len(HSIConfig().control_seeds) >= 3 and len(CAASettings().control_seeds) >= 3


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


ITEMS = [_item(i, "(A)" if i % 3 else "(B)") for i in range(8)]


def test_caa_selection_is_letter_balanced_with_controls(llama: LoadedModel) -> None:
    fitted, evidence = fit_caa_selection(
        llama, ITEMS[:4], ITEMS[4:], layers=[0, 1], multipliers=[1.0, 2.0], progress=False
    )
    assert len(evidence.item_ids) == 8 and sum(i.endswith("~swap") for i in evidence.item_ids) == 4
    assert evidence.control_p is not None and evidence.control_p.shape == (4, 8)
    assert fitted.metadata["balance_letters"] and fitted.metadata["n_train"] == 8
    assert set(fitted.metadata["direction_diagnostics"]) >= {"consistency", "d_prime", "auroc"}
    assert selection_verdict(evidence, n_resamples=200)["verdict"] in (NO_RELIABLE_EFFECT, RELIABLE_EFFECT)


def test_iti_and_hsi_selections_carry_controls_and_diagnostics(llama: LoadedModel) -> None:
    _, iti = fit_iti_selection(llama, ITEMS[:4], ITEMS[4:], k=2, alphas=(2.0,), progress=False)
    assert iti.evidence is not None and iti.evidence.control_p is not None
    assert len(iti.evidence.item_ids) == 8
    config = HSIConfig(
        k=2, alphas=(2.0,), n_sweep=2, heads_subset=((0, 1), (1, 0), (2, 3)), balance_format=True
    )
    fitted, hsi = fit_hsi_selection(llama, ITEMS[:6], ITEMS[6:], config, progress=False)
    assert hsi.evidence is not None and hsi.evidence.control_p is not None
    assert fitted.metadata["balance_format"] and fitted.metadata["direction_diagnostics"]["heads"]
    assert "diagnostics" in fitted.metadata["sweep"]["top"][0]
