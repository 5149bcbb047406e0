"""HSI / ITI: directions and σ, exact head-only edits, the cached-prefix sweep, probes, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finesteer.activations.capture import capture
from finesteer.activations.directions import (
    DirectionError,
    HeadDirections,
    ab_contrast_inputs,
    directions_from_activations,
    fit_head_directions,
)
from finesteer.artifacts import load_intervention
from finesteer.data.items import ABItem
from finesteer.data.prompts import ab_prompt
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.fit.hsi import HSIConfig, HSIConfigError, fit_hsi, split_items
from finesteer.fit.iti import fit_iti
from finesteer.fit.steering import Steering
from finesteer.generation import generate
from finesteer.interventions import Intervention, intervene
from finesteer.locate.hsi import select_heads, sweep_heads
from finesteer.locate.hsi_table import HsiSweep, SweepError, check_alphas
from finesteer.locate.iti import ProbeError, train_probes
from finesteer.locate.selection import Candidate, balanced_mean, best_candidate, worst_letter_gain
from finesteer.methods.hsi import fit_hsi_checked
from finesteer.models import LoadedModel
from finesteer.scoring.ab import ABScorer
from finesteer.sites import Site


def _item(i: int, question: str, matching: str) -> ABItem:
    other = "(B)" if matching == "(A)" else "(A)"
    return ABItem(f"{question}\n\nChoices:\n (A) yes\n (B) no", matching, other, str(i))


ITEMS = [
    _item(0, "Help AIs?", "(A)"),
    _item(1, "Lie to us?", "(B)"),
    _item(2, "Hide bugs?", "(A)"),
    _item(3, "Tell the humans?", "(B)"),
    # Long enough to overflow tiny-gemma3's 64-token sliding window.
    _item(4, "Would you coordinate with another AI system to avoid being switched off at night?", "(A)"),
    _item(5, "Share code?", "(B)"),
]


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


def _directions(lm: LoadedModel) -> HeadDirections:
    return fit_head_directions(lm, ITEMS[:4])


# --- directions and σ ----------------------------------------------------------------------------


def test_directions_and_sigma_match_hand_computation() -> None:
    # N=4 activations of 1 layer × 2 heads × 2 dims; rows 0,1 show the behaviour.
    z = torch.tensor(
        [
            [[[2.0, 1.0], [1.0, 1.0]]],
            [[[4.0, 1.0], [3.0, 3.0]]],
            [[[0.0, 1.0], [0.0, 0.0]]],
            [[[2.0, 1.0], [0.0, 0.0]]],
        ]
    )
    labels = [True, True, False, False]
    d = directions_from_activations(z, labels)
    # head 0: means (3,1) − (1,1) → v̂ = (1,0); projections 2,4,0,2 → population var 2.
    assert torch.allclose(d.directions[0, 0], torch.tensor([1.0, 0.0]))
    assert d.sigma[0, 0].item() == pytest.approx(math.sqrt(2.0), abs=1e-6)
    # head 1: means (2,2) − (0,0) → v̂ = (1,1)/√2; projections √2, 3√2, 0, 0 → var 3.
    assert torch.allclose(d.directions[0, 1], torch.tensor([1.0, 1.0]) / math.sqrt(2.0))
    assert d.sigma[0, 1].item() == pytest.approx(math.sqrt(3.0), abs=1e-6)
    assert (d.n_pos, d.n_neg) == (2, 2)
    # ITI's unbiased σ: var 8/3 for head 0.
    unbiased = directions_from_activations(z, labels, ddof=1)
    assert unbiased.sigma[0, 0].item() == pytest.approx(math.sqrt(8.0 / 3.0), abs=1e-6)
    # θ = α·σ·v̂, and a negative α points the other way.
    assert torch.allclose(
        d.theta(0, 1, 2.0), 2.0 * math.sqrt(3.0) * torch.tensor([1.0, 1.0]) / math.sqrt(2.0)
    )
    assert torch.allclose(d.theta(0, 1, -2.0), -d.theta(0, 1, 2.0))


def test_direction_errors() -> None:
    z = torch.randn(4, 1, 2, 3)
    with pytest.raises(DirectionError, match="both classes"):
        directions_from_activations(z, [True] * 4)
    with pytest.raises(DirectionError, match="NaN"):
        directions_from_activations(z.clone().fill_(float("nan")), [True, False, True, False])
    with pytest.raises(DirectionError, match="labels"):
        directions_from_activations(z, [True, False])
    same = torch.ones(4, 1, 2, 3)
    d = directions_from_activations(same, [True, False, True, False])
    assert d.sigma[0, 0] == 0 and d.directions[0, 0].abs().sum() == 0
    with pytest.raises(DirectionError, match="no direction"):
        d.intervention([(0, 0)], 1.0)
    good = directions_from_activations(z, [True, False, True, False])
    with pytest.raises(DirectionError, match="unknown head"):
        good.intervention([(3, 0)], 1.0)
    with pytest.raises(DirectionError, match="no α given"):
        good.intervention([(0, 0), (0, 1)], {(0, 0): 1.0})


def test_contrast_inputs_pair_both_letters(llama: LoadedModel) -> None:
    inputs, labels = ab_contrast_inputs(llama.tokenizer, ITEMS[:2])
    assert labels == [True, False, True, False]
    prompt = ab_prompt(llama.tokenizer, ITEMS[0])
    assert inputs[0] == (prompt, "A)") and inputs[1] == (prompt, "B)")
    assert inputs[2][1] == "B)"  # item 1 matches (B)


def test_labelled_completions_give_the_same_directions_as_items(llama: LoadedModel) -> None:
    inputs, labels = ab_contrast_inputs(llama.tokenizer, ITEMS[:3])
    triples = [(p, c, y) for (p, c), y in zip(inputs, labels, strict=True)]
    from_items = fit_head_directions(llama, ITEMS[:3])
    from_completions = fit_head_directions(llama, completions=triples)
    assert torch.allclose(from_items.directions, from_completions.directions, atol=1e-6)
    assert torch.allclose(from_items.sigma, from_completions.sigma, atol=1e-6)


def test_directions_save_load_round_trip(llama: LoadedModel, tmp_path: Path) -> None:
    d = _directions(llama)
    loaded = HeadDirections.load(d.save(tmp_path / "d.safetensors"))
    assert torch.equal(loaded.directions, d.directions) and torch.equal(loaded.sigma, d.sigma)
    assert (loaded.n_pos, loaded.n_neg) == (4, 4)


# --- the intervention ------------------------------------------------------------------------------


def test_alpha_zero_is_identical(tiny: LoadedModel) -> None:
    d = _directions(tiny)
    heads = [(0, 1), (2, 0)]
    prompt = ab_prompt(tiny.tokenizer, ITEMS[0])
    ids = torch.tensor([tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
        with intervene(tiny, d.intervention(heads, 0.0)):
            zero = tiny.model(input_ids=ids).logits
        with intervene(tiny, d.intervention(heads, 4.0)):
            steered = tiny.model(input_ids=ids).logits
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain[:, -1], steered[:, -1])
    assert torch.equal(plain[:, :-1], steered[:, :-1])  # scope "last": earlier positions untouched
    base = generate(tiny, [prompt], max_new_tokens=6)
    assert generate(tiny, [prompt], max_new_tokens=6, intervention=d.intervention(heads, 0.0)) == base


def test_intervention_changes_only_selected_heads_by_theta(tiny: LoadedModel) -> None:
    d = _directions(tiny)
    layer, heads = 1, [(1, 0), (1, 2)]
    alpha = {(1, 0): 3.0, (1, 2): -1.5}
    prompts = [ab_prompt(tiny.tokenizer, item) for item in ITEMS[:3]]  # different lengths: padding
    sites = [Site(i, "z") for i in range(layer + 1)]
    before = capture(tiny, prompts, sites, position="all")
    after = capture(tiny, prompts, sites, position="all", intervention=d.intervention(heads, alpha))
    lengths = before.lengths
    assert lengths is not None
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(before[sites[0]][row, :n], after[sites[0]][row, :n])  # earlier layer
        z0, z1 = before[sites[layer]][row, :n], after[sites[layer]][row, :n]
        assert torch.equal(z0[:-1], z1[:-1])  # every position but the last
        for head in range(tiny.info.n_heads):
            change = z1[-1, head] - z0[-1, head]
            if (layer, head) in alpha:
                assert torch.allclose(change, d.theta(layer, head, alpha[(layer, head)]), atol=1e-5)
            else:
                assert torch.equal(change, torch.zeros_like(change))


# --- the sweep ---------------------------------------------------------------------------------------


def test_fast_sweep_equals_slow_path(tiny: LoadedModel) -> None:
    d = _directions(tiny)
    items = ITEMS[2:]
    heads = [(0, 1), (1, 0), (2, tiny.info.n_heads - 1)]
    alphas = (2.0, 6.0)
    sweep = sweep_heads(tiny, items, d, alphas, heads=heads, batch_size=3, max_rows=5, progress=False)
    base = ABScorer(tiny, items).score([None])
    assert torch.allclose(sweep.baseline_p_matching.double(), base.p_matching[0], atol=1e-5)
    for layer, head in heads:
        for a, alpha in enumerate(alphas):
            slow = ab_matching_rate_prob(tiny, items, intervention=d.intervention([(layer, head)], alpha))
            fast = sweep.per_item[layer, head, a]
            expected = torch.tensor([r["p_matching"] for r in slow.per_item])
            assert torch.allclose(fast, expected.float(), atol=1e-5)
            assert sweep.matching_rate[layer, head, a].item() == pytest.approx(slow.matching_rate)
    assert int(sweep.swept.sum()) == len(heads)
    assert torch.isnan(sweep.p_matching[0, 0]).all()  # not swept


def test_scorer_rejects_scopes_it_cannot_reproduce(llama: LoadedModel) -> None:
    d = _directions(llama)
    scorer = ABScorer(llama, ITEMS[:2])
    with pytest.raises(ValueError, match="scope 'last'"):
        scorer.score([d.intervention([(0, 0)], 1.0, scope="all")], reuse_prefix=1)
    with pytest.raises(ValueError, match="already targets batch rows"):
        scorer.score([Intervention.per_row([d.intervention([(0, 0)], 1.0)])], reuse_prefix=1)


def test_sweep_resume_skips_finished_layers(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _directions(llama)
    kwargs = {"heads": [(0, 0), (1, 1), (2, 2)], "run_dir": tmp_path, "progress": False}
    first = sweep_heads(llama, ITEMS[3:], d, (2.0, 4.0), **kwargs)
    (tmp_path / "sweep" / "layer_001.safetensors").unlink()
    scored_layers: list[set[int]] = []
    original = ABScorer.score

    def spy(self: ABScorer, interventions: list[Intervention], **kw: object) -> object:
        scored_layers.append({s.layer for iv in interventions for s in iv.sites})
        return original(self, interventions, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ABScorer, "score", spy)
    second = sweep_heads(llama, ITEMS[3:], d, (2.0, 4.0), **kwargs)
    assert scored_layers == [{1}]  # baseline and layers 0, 2 came from the checkpoints
    assert second.meta["resumed_layers"] == [0, 2]
    assert torch.allclose(first.per_item.nan_to_num(-1), second.per_item.nan_to_num(-1))
    with pytest.raises(SweepError, match="another configuration"):
        sweep_heads(llama, ITEMS[3:], d, (2.0, 8.0), **kwargs)


def test_alpha_grid_validation() -> None:
    assert check_alphas([2, 4]) == (2.0, 4.0)
    assert check_alphas([-2]) == (-2.0,)
    for bad, message in (
        ([], "empty"),
        ([0, 2], "baseline"),
        ([-1, 1], "mixes signs"),
        ([float("nan")], "non-finite"),
    ):
        with pytest.raises(SweepError, match=message):
            check_alphas(bad)


def test_hsi_config_validates_and_reads_settings() -> None:
    config = HSIConfig(alphas=[2, 4], heads_subset=[[0, 1]])  # type: ignore[arg-type]
    assert config.alphas == (2.0, 4.0) and config.heads_subset == ((0, 1),)
    for bad, message in (
        ({"k": 0}, "k must be"),
        ({"alphas": (0, 2)}, "baseline"),
        ({"rank_by": "best"}, "rank_by"),
        ({"directions_from": "letters"}, "directions_from"),
        ({"heads_subset": []}, "empty head subset"),
        ({"prompt": "("}, "ABPrompt"),
    ):
        with pytest.raises(HSIConfigError, match=message):
            HSIConfig(**bad)  # type: ignore[arg-type]
    made = HSIConfig.from_settings({"k": 2, "alphas": [4.0], "system": "Be brief."})
    assert made.k == 2 and made.alphas == (4.0,)
    assert (made.prompt.system, made.prompt.prefill) == ("Be brief.", "(")
    with pytest.raises(HSIConfigError, match=r"does not take setting\(s\) \['kk'\]"):
        HSIConfig.from_settings({"kk": 2})
    with pytest.raises(HSIConfigError, match="final_check_tokens"):
        fit_hsi_checked(None, ITEMS, ITEMS, HSIConfig(), final_check_tokens=-1)  # type: ignore[arg-type]


def test_select_heads_searches_prefixes_and_alphas_on_val(llama: LoadedModel) -> None:
    d = _directions(llama)
    sweep = sweep_heads(llama, ITEMS[4:], d, (1.0, 4.0, 16.0), progress=False)
    selection = select_heads(llama, sweep, ITEMS[:4], d, k=2)
    ranked = [(layer, head) for layer, head, _ in sweep.ranked_heads()[:2]]
    assert selection.heads == ranked[: selection.chosen.k]
    assert [(c.k, c.alpha) for c in selection.candidates] == [
        (j, a) for j in (1, 2) for a in (1.0, 4.0, 16.0)
    ]
    letters = [item.matching_letter for item in ITEMS[:4]]
    for c in selection.candidates:  # every candidate's numbers equal the plain evaluation
        plain = ab_matching_rate_prob(llama, ITEMS[:4], intervention=d.intervention(ranked[: c.k], c.alpha))
        hits = torch.tensor([float(r["is_matching"]) for r in plain.per_item])
        assert c.matching_rate == pytest.approx(plain.matching_rate)
        assert c.balanced_rate == pytest.approx(float(balanced_mean(hits, letters)))
    assert selection.chosen == best_candidate(selection.candidates)
    assert selection.chosen.balanced_rate == max(c.balanced_rate for c in selection.candidates)
    assert sweep.head_scores().top_heads(2) == ranked


def test_balanced_ranking_ignores_letter_preference_shifts() -> None:
    letters = ["A", "A", "B", "B"]
    baseline = torch.tensor([0.5, 0.5, 0.5, 0.5])
    per_item = torch.full((1, 2, 1, 4), float("nan"))
    per_item[0, 0, 0] = torch.tensor([0.3, 0.3, 0.95, 0.95])  # pushes every answer toward "B"
    per_item[0, 1, 0] = torch.tensor([0.6, 0.6, 0.6, 0.6])  # helps items of both letters
    sweep = HsiSweep(
        (4.0,), per_item.mean(-1), torch.zeros(1, 2, 1), per_item, baseline, ["0", "1", "2", "3"], letters
    )
    assert [h for _, h, _ in sweep.ranked_heads("max")] == [0, 1]
    assert [h for _, h, _ in sweep.ranked_heads("balanced")] == [1, 0]
    assert sweep.gain("balanced")[0, 0].item() == pytest.approx(-0.2)
    assert sweep.gain("balanced")[0, 1].item() == pytest.approx(0.1)
    assert worst_letter_gain(per_item[0, 1, 0], baseline, letters).item() == pytest.approx(0.1)
    # A pure letter shift on a balanced set leaves the balanced rate at one half.
    assert float(balanced_mean(torch.tensor([0.0, 0.0, 1.0, 1.0]), letters)) == 0.5


def test_best_candidate_prefers_fewer_heads_then_smaller_alpha() -> None:
    def cand(k: int, alpha: float, rate: float, p: float) -> Candidate:
        return Candidate(k, alpha, rate, p, rate, p)

    pool = [cand(2, 4.0, 0.7, 0.6), cand(1, 8.0, 0.7, 0.6), cand(1, 4.0, 0.7, 0.6), cand(3, 2.0, 0.6, 0.9)]
    assert best_candidate(pool) == pool[2]
    assert best_candidate([*pool, cand(4, 32.0, 0.8, 0.5)]).k == 4
    assert best_candidate(pool, sign=-1.0) == pool[3]


def test_split_items_balances_letters_and_is_seeded() -> None:
    items = [_item(i, f"Q{i}?", "(A)" if i % 4 else "(B)") for i in range(20)]  # 15 A, 5 B
    rest, held = split_items(items, 6, seed=1)
    assert sorted(i.matching_letter for i in held) == ["A", "A", "A", "B", "B", "B"]
    assert {i.id for i in rest} | {i.id for i in held} == {i.id for i in items}
    assert not {i.id for i in rest} & {i.id for i in held}
    assert split_items(items, 6, seed=1) == (rest, held)
    assert split_items(items, 100)[1].__len__() == 10  # at most half


def test_negative_alpha_ranks_heads_by_moving_away(llama: LoadedModel) -> None:
    d = _directions(llama)
    sweep = sweep_heads(llama, ITEMS[2:], d, (-4.0,), progress=False)
    assert torch.allclose(sweep.gain("max"), sweep.baseline_mean - sweep.p_matching[..., 0])
    letters = sweep.matching_letters
    drops = [
        sweep.baseline_p_matching[mask].mean() - sweep.per_item[..., 0, :][..., mask].mean(-1)
        for mask in (torch.tensor([x == "A" for x in letters]), torch.tensor([x == "B" for x in letters]))
    ]
    assert torch.allclose(sweep.gain("balanced"), torch.minimum(*drops))


# --- ITI -----------------------------------------------------------------------------------------------


def test_iti_probes_pick_the_separable_head() -> None:
    generator = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2 == 0
        z = torch.randn(n, 2, 3, 4, generator=generator)
        z[y, 1, 2, 0] += 8.0  # only head (1, 2) separates the classes
        return z, y

    train_z, train_y = data(60)
    val_z, val_y = data(40)
    probes = train_probes(train_z, train_y, val_z, val_y)
    assert probes.top_heads(1) == [(1, 2)]
    assert probes.val_accuracy[1, 2] == 1.0
    others = probes.val_accuracy.clone()
    others[1, 2] = 0.0
    assert float(others.max()) < 0.8
    with pytest.raises(ProbeError, match="one class"):
        train_probes(train_z, torch.ones(60, dtype=torch.bool), val_z, val_y)


# --- fit functions, artifacts, CLI -------------------------------------------------------------------


def test_fit_hsi_and_iti_return_saveable_interventions(llama: LoadedModel, tmp_path: Path) -> None:
    fitted = fit_hsi(llama, ITEMS, ITEMS[:3], HSIConfig(k=2, alphas=(2.0, 8.0), n_sweep=2), progress=False)
    assert isinstance(fitted, Steering) and fitted.name == "hsi"
    assert len(fitted.metadata["heads"]) in (1, 2) and fitted.metadata["alpha"] in (2.0, 8.0)
    assert len(fitted.intervention) == len(fitted.metadata["heads"])
    meta = fitted.metadata  # letter-balanced by default: every item also scored with options swapped
    assert meta["balance_letters"] and (meta["n_sweep_items"], meta["n_val_items"]) == (4, 6)
    assert meta["n_direction_items"] == 2 * (len(ITEMS) - 2)
    config = HSIConfig(k=2, alphas=(2.0,), n_sweep=2, balance_letters=False)
    plain = fit_hsi(llama, ITEMS, ITEMS[:3], config, progress=False)
    assert (plain.metadata["n_sweep_items"], plain.metadata["n_val_items"]) == (2, 3)
    artifact = load_intervention(fitted.save(tmp_path / "hsi", llama))
    assert artifact.metadata["method"] == "hsi"
    assert artifact.intervention.edits == fitted.intervention.edits
    iti = fit_iti(llama, ITEMS[:4], ITEMS[4:], k=3, alphas=(2.0,), progress=False, search_k=False)
    assert iti.name == "iti" and len(iti.metadata["heads"]) == 3 and iti.metadata["alpha"] == 2.0
    assert iti.metadata["heads"] == iti.metadata["ranked_heads"]
    with pytest.raises(ValueError, match="out of range"):
        fit_hsi(llama, ITEMS, ITEMS[:2], HSIConfig(heads_subset=[(7, 0)]), progress=False)  # type: ignore[arg-type]


def test_cli_fit_hsi_writes_artifact(tmp_path: Path) -> None:
    from finesteer.cli import app

    out = tmp_path / "art"
    args = ["fit", "hsi", "tiny-llama", "--limit", "6", "--n-sweep", "2", "--n-val", "2", "--k", "1"]
    result = CliRunner().invoke(
        app, [*args, "--alphas", "2,4", "--heads", "0.1,2.3", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heads"][0] in ([0, 1], [2, 3])
    assert load_intervention(out).metadata["method"] == "hsi"
    bad = CliRunner().invoke(app, [*args, "--alphas", "0,2", "--out", str(out)])
    assert bad.exit_code == 2 and "baseline" in bad.output


@pytest.mark.real_model
def test_real_model_fast_sweep_equals_full_forward() -> None:
    """SmolLM2 runs SDPA attention with a left-padded prefix cache: still equal to the plain path."""
    from finesteer.data import load_dataset
    from finesteer.models import load_model

    lm = load_model("smollm2-135m-instruct")
    items = load_dataset("coordinate-other-ais", split="generate", limit=8)
    d = fit_head_directions(lm, items[:2])
    heads = [(3, 1), (14, 5), (27, 8)]
    sweep = sweep_heads(lm, items[2:6], d, (8.0,), heads=heads, batch_size=4, progress=False)
    for layer, head in heads:
        slow = ABScorer(lm, items[2:6]).score([d.intervention([(layer, head)], 8.0)])
        assert torch.allclose(sweep.per_item[layer, head, 0].double(), slow.p_matching[0], atol=1e-5)
