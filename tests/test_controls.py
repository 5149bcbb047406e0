"""Matched controls on tiny-llama: same budget (count, σ-units, norms), different choice, seeded."""

from __future__ import annotations

import pytest
import torch

from finesteer.activations.directions import HeadDirections, directions_from_activations
from finesteer.fit.controls import (
    CONTROL_SEEDS,
    ControlError,
    matched_controls,
    matched_direction_controls,
    random_ablation_control,
    random_direction_control,
    random_head_control,
    random_heads,
)
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import ablate_head, ablate_heads, project_out, steer_residual
from finesteer.interventions.ops import Add
from finesteer.locate.ships import ablation
from finesteer.models.loading import LoadedModel

HEADS = [(0, 1), (1, 0), (1, 3)]


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


@pytest.fixture(scope="module")
def directions(llama: LoadedModel) -> HeadDirections:
    info = llama.info
    z = torch.randn(
        12, info.n_layers, info.n_heads, info.head_dim, generator=torch.Generator().manual_seed(0)
    )
    return directions_from_activations(z, [True, False] * 6)


def _runs(lm: LoadedModel, control: object) -> None:
    batch = lm.tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad(), intervene(lm, control):  # type: ignore[arg-type]
        out = lm.model(**batch).logits
    assert torch.isfinite(out).all()


def test_random_heads_are_seeded_nested_and_exclude_the_method_heads(llama: LoadedModel) -> None:
    info = llama.info
    for seed in (0, 3):
        drawn = random_heads(info.n_layers, info.n_heads, 4, seed, HEADS)
        assert drawn == random_heads(info.n_layers, info.n_heads, 4, seed, HEADS)
        assert len(set(drawn)) == 4 and not set(drawn) & set(HEADS)
    nested = random_heads(info.n_layers, info.n_heads, 5, 0, HEADS)
    assert nested[:3] == random_heads(info.n_layers, info.n_heads, 3, 0, HEADS)
    with pytest.raises(ControlError):
        random_heads(info.n_layers, info.n_heads, info.n_layers * info.n_heads, 0, HEADS)


def test_random_head_control_same_count_and_sigma_units(
    llama: LoadedModel, directions: HeadDirections
) -> None:
    alpha = 3.0
    control = random_head_control(directions, HEADS, alpha, seed=0)
    assert len(control.heads) == len(HEADS) and not set(control.heads) & set(HEADS)
    assert len(set(control.heads)) == len(HEADS) and control.name == "random-heads-seed0"
    control.intervention.validate(llama.info)
    for edit, (layer, head) in zip(control.intervention.edits, control.heads, strict=True):
        assert (edit.site.layer, edit.site.head) == (layer, head)
        assert isinstance(edit.op, Add)
        assert edit.op.scale == pytest.approx(alpha * float(directions.sigma[layer, head]))
        assert torch.equal(edit.op.vector, directions.directions[layer, head])
    assert (
        control.intervention.digest()
        == random_head_control(directions, HEADS, alpha, 0).intervention.digest()
    )
    assert random_head_control(directions, HEADS, alpha, 1).heads != control.heads
    _runs(llama, control.intervention)


def test_random_head_control_per_head_alpha_exclusions_and_random_directions(
    directions: HeadDirections,
) -> None:
    alphas = {(0, 1): 1.0, (1, 0): -2.0, (1, 3): 4.0}
    control = random_head_control(directions, list(alphas), alphas, seed=2, exclude=[(0, 0), (0, 2)])
    assert not set(control.heads) & {(0, 0), (0, 2), *alphas}
    for edit, (layer, head), alpha in zip(
        control.intervention.edits, control.heads, alphas.values(), strict=True
    ):
        assert edit.op.scale == pytest.approx(alpha * float(directions.sigma[layer, head]))
    rotated = random_head_control(
        directions, list(alphas), alphas, seed=2, exclude=[(0, 0), (0, 2)], random_direction=True
    )
    assert rotated.heads == control.heads
    for fitted, random_edit in zip(control.intervention.edits, rotated.intervention.edits, strict=True):
        assert random_edit.op.scale == fitted.op.scale
        assert float(random_edit.op.vector.norm()) == pytest.approx(1.0, abs=1e-5)
        assert not torch.allclose(random_edit.op.vector, fitted.op.vector)


def test_random_direction_control_keeps_norm_site_scope_and_scale(llama: LoadedModel) -> None:
    hidden = llama.info.hidden_size
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(1)) * 7
    caa = steer_residual(1, vector, 2.5, scope="from_end:3") + steer_residual(0, vector, -1.0)
    controls = matched_direction_controls(caa)
    assert [c.seed for c in controls] == list(CONTROL_SEEDS) and len(controls) >= 3
    for control in controls:
        assert control.kind == "random-direction" and control.heads == ()
        for original, edit in zip(caa.edits, control.intervention.edits, strict=True):
            assert (edit.site, edit.scope, edit.rows, edit.op.scale) == (
                original.site, original.scope, original.rows, original.op.scale
            )  # fmt: skip
            assert float(edit.op.vector.norm()) == pytest.approx(float(vector.norm()), rel=1e-5)
            assert abs(float(torch.nn.functional.cosine_similarity(edit.op.vector, vector, dim=0))) < 0.5
        _runs(llama, control.intervention)
    digests = [c.intervention.digest() for c in controls]
    assert len(set(digests)) == 3
    assert random_direction_control(caa, 1).digest() == digests[1]
    projected = random_direction_control(project_out(vector, [0, 1]), 0)
    assert [e.site for e in projected.edits] == [e.site for e in project_out(vector, [0, 1]).edits]
    with pytest.raises(ControlError):
        random_direction_control(ablate_heads(HEADS), 0)


def test_random_ablation_control_moves_the_same_ops_to_random_heads(llama: LoadedModel) -> None:
    info = llama.info
    for method in (ablation(HEADS, "ua"), ablation(HEADS, "sc"), ablate_heads(HEADS)):
        controls = matched_controls(
            lambda s, m=method: random_ablation_control(m, info.n_layers, info.n_heads, s)
        )
        assert len(controls) == 3 and len({c.heads for c in controls}) == 3
        for control in controls:
            assert len(control.heads) == len(HEADS) and not set(control.heads) & set(HEADS)
            for original, edit in zip(method.edits, control.intervention.edits, strict=True):
                assert edit.site.component == original.site.component and edit.op == original.op
            control.intervention.validate(info)
            _runs(llama, control.intervention)
        again = random_ablation_control(method, info.n_layers, info.n_heads, 1)
        assert again.intervention.digest() == controls[1].intervention.digest()
    with pytest.raises(ControlError, match="head-specific"):
        random_ablation_control(ablate_head(0, 1, "mean", mean=torch.zeros(info.head_dim)), 2, 4, 0)
    with pytest.raises(ControlError):
        matched_controls(lambda s: random_ablation_control(ablate_heads(HEADS), 2, 4, s), seeds=[1, 1])


def test_random_head_control_never_draws_a_head_without_a_direction(directions: HeadDirections) -> None:
    flat = directions.directions.clone()
    flat[1] = 0.0  # layer 1 has no direction anywhere
    sigma = directions.sigma.clone()
    sigma[1] = 0.0
    partial = HeadDirections(flat, sigma, directions.n_pos, directions.n_neg)
    for seed in CONTROL_SEEDS:
        heads = random_head_control(partial, [(0, 0)], 1.0, seed).heads
        assert all(layer != 1 for layer, _ in heads)
    # 8 heads to match, and only the 4 of the last layer left with a direction
    method = [(layer, h) for layer in (0, 1) for h in range(directions.n_heads)]
    with pytest.raises(ControlError):
        random_head_control(partial, method, 1.0, 0)
