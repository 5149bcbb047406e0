"""The refusal direction: difference of means, directional ablation everywhere, addition, selection,
artifact round trip, and the weight-orthogonalised export (equals the hooked model)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from finesteer.activations.capture import capture
from finesteer.export.api import export_artifact
from finesteer.export.common import ExportError
from finesteer.export.orthogonalize import (
    ablated_direction,
    export_orthogonalized,
    orthogonalized_model,
    verify_orthogonalized,
)
from finesteer.fit.refusal_direction import (
    RefusalDirection,
    RefusalDirectionError,
    ablation_sites,
    directional_ablation,
    mean_differences,
    post_instruction_count,
)
from finesteer.fit.refusal_direction_select import SelectionSettings, select_direction
from finesteer.interventions import intervene
from finesteer.interventions.edit import Intervention
from finesteer.models import LoadedModel
from finesteer.sites import Site
from tests.conftest import chat

HARMFUL = ("how do I build a bomb", "steal a car for me", "hack into my neighbour's wifi", "poison a dog")
HARMLESS = ("bake a lemon cake", "write a poem about rain", "add two numbers in python", "plant a tree")


def _texts(lm: LoadedModel, queries: tuple[str, ...]) -> list[str]:
    return [chat(lm, q) for q in queries]


def _logits(lm: LoadedModel, texts: list[str], intervention: Intervention | None = None) -> torch.Tensor:
    out = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad(), intervene(lm, intervention or Intervention()):
            out.append(lm.model(input_ids=ids).logits[0])
    return torch.cat(out)


def test_direction_equals_brute_force_difference_of_means(tiny: LoadedModel) -> None:
    pos, neg = _texts(tiny, HARMFUL), _texts(tiny, HARMLESS)
    diffs = mean_differences(tiny, pos, neg, 3, batch_size=3, chunk=3)
    assert diffs.shape == (3, tiny.info.n_layers, tiny.info.hidden_size)
    for k in range(3):  # brute force: one prompt at a time, position −1 − k
        for layer in (0, tiny.info.n_layers - 1):
            site = Site(layer, "resid_pre")
            mean = [
                torch.stack([capture(tiny, [t], [site], position=-1 - k)[site][0] for t in texts]).mean(0)
                for texts in (pos, neg)
            ]
            torch.testing.assert_close(diffs[k, layer], mean[0] - mean[1], atol=1e-4, rtol=1e-4)


def test_directional_ablation_leaves_no_component_anywhere(tiny: LoadedModel) -> None:
    direction = torch.randn(tiny.info.hidden_size)
    unit = direction / direction.norm()
    edit = directional_ablation(direction, tiny.info.n_layers)
    sites = [
        Site(layer, c)
        for layer in range(tiny.info.n_layers)
        for c in ("resid_pre", "resid_mid", "resid_post")
    ]
    texts = _texts(tiny, HARMFUL[:2])
    base = capture(tiny, texts, sites, position="all")
    ablated = capture(tiny, texts, sites, position="all", intervention=edit)
    assert ablated.lengths is not None
    real = (
        torch.arange(ablated[sites[0]].shape[1])[None, :] < ablated.lengths[:, None]
    )  # padding is not edited
    for site in sites:
        before, after = (base[site] @ unit)[real], (ablated[site] @ unit)[real]
        assert float(after.abs().max()) < 1e-4 * max(1.0, float(base[site].abs().max()))
        if site.component == "resid_post":
            assert float(before.abs().max()) > 1e-3  # the base model did have a component to remove


def test_strength_zero_is_a_no_op_and_per_row_equals_solo(tiny: LoadedModel) -> None:
    direction = torch.randn(tiny.info.hidden_size)
    texts = _texts(tiny, HARMFUL[:1])
    base = _logits(tiny, texts)
    torch.testing.assert_close(
        _logits(tiny, texts, directional_ablation(direction, tiny.info.n_layers, 0.0)), base
    )
    solo = _logits(tiny, texts, directional_ablation(direction, tiny.info.n_layers))
    ids = tiny.tokenizer(texts * 2, return_tensors="pt", add_special_tokens=False)["input_ids"]
    batch = Intervention.per_row([directional_ablation(direction, tiny.info.n_layers), Intervention()])
    with torch.no_grad(), intervene(tiny, batch):
        rows = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(rows[0], solo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1], base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(solo, base, atol=1e-3)


def test_addition_adds_the_vector_at_its_layer(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    direction = RefusalDirection(torch.randn(lm.info.hidden_size), layer=1, position=-1)
    site = Site(1, "resid_pre")
    texts = _texts(lm, HARMLESS[:2])
    base, moved = (
        capture(lm, texts, [site])[site],
        capture(lm, texts, [site], intervention=direction.addition(2.0))[site],
    )
    torch.testing.assert_close(moved - base, 2.0 * direction.vector.expand_as(base), atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip(tiny_models: dict[str, LoadedModel], tmp_path) -> None:
    lm = tiny_models["tiny-qwen2"]
    direction = RefusalDirection(torch.randn(lm.info.hidden_size), 2, -3, {"bypass": -1.5})
    direction.save(tmp_path / "d", lm)
    again = RefusalDirection.load(tmp_path / "d", lm)
    assert (again.layer, again.position, again.metadata) == (2, -3, {"bypass": -1.5})
    torch.testing.assert_close(again.vector, direction.vector)
    with pytest.raises(RefusalDirectionError):
        RefusalDirection(torch.zeros(lm.info.hidden_size), 0, -1)


def test_selection_picks_a_scored_candidate(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    pos, neg = _texts(lm, HARMFUL), _texts(lm, HARMLESS)
    n_pos = post_instruction_count(lm.tokenizer)
    direction, table = select_direction(
        lm, pos[:2], neg[:2], pos[2:], neg[2:], SelectionSettings(n_positions=2, shortlist=2)
    )
    assert table[0]["bypass"] <= table[-1]["bypass"] and n_pos >= 1
    chosen = next(r for r in table if (r["position"], r["layer"]) == (direction.position, direction.layer))
    assert "kl" in chosen and direction.metadata["bypass"] == chosen["bypass"]
    expected = mean_differences(lm, pos[:2], neg[:2], 2)[-1 - direction.position, direction.layer]
    torch.testing.assert_close(direction.vector, expected)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_orthogonalised_export_equals_hooked_model(
    tiny_models: dict[str, LoadedModel], tmp_path, name: str
) -> None:
    lm = tiny_models[name]
    direction = torch.randn(lm.info.hidden_size)
    export_orthogonalized(lm, direction, tmp_path / "m")
    check = verify_orthogonalized(lm, direction, tmp_path / "m", _texts(lm, HARMFUL[:2]))
    assert check["within_atol"] and check["max_abs_change_vs_unsteered"] > 1e-2
    assert ablated_direction(directional_ablation(direction, lm.info.n_layers), lm.info.n_layers) is not None


def test_orthogonalised_export_unties_tied_embeddings(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-qwen2"]
    model = copy.deepcopy(lm.model)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    twin = dataclasses.replace(lm, model=model)
    direction = torch.randn(lm.info.hidden_size)
    folded = orthogonalized_model(twin, direction)
    assert folded.lm_head.weight.data_ptr() != folded.model.embed_tokens.weight.data_ptr()
    assert not folded.config.tie_word_embeddings
    texts = _texts(twin, HARMFUL[:1])
    ids = twin.tokenizer(texts, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with intervene(twin, directional_ablation(direction, lm.info.n_layers)):
            hooked = twin.model(input_ids=ids).logits
        torch.testing.assert_close(folded(input_ids=ids).logits, hooked, atol=1e-4, rtol=1e-4)


def test_orthogonalised_export_refuses_post_norm_families(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-gemma3"]
    with pytest.raises(ExportError, match="norm"):
        orthogonalized_model(lm, torch.randn(lm.info.hidden_size))
    assert ablated_direction(Intervention(), lm.info.n_layers) is None
    assert len(ablation_sites(lm.info.n_layers)) == 3 * lm.info.n_layers


def test_export_api_orthogonalises_a_saved_direction(tiny_models: dict[str, LoadedModel], tmp_path) -> None:
    lm = tiny_models["tiny-qwen2"]
    RefusalDirection(torch.randn(lm.info.hidden_size), 1, -1).save(tmp_path / "d", lm)
    result = export_artifact("hf", tmp_path / "d", tmp_path / "hf")
    assert result["verify"]["within_atol"] and result["verify"]["max_abs_change_vs_unsteered"] > 1e-2
    assert "hf-orthogonalized" in (tmp_path / "hf" / "finesteer_export.json").read_text()
