"""Head-direction scores equal a brute-force per-head projection; ranking agreement statistics."""

from __future__ import annotations

import pytest
import torch

from finesteer.activations.capture import capture
from finesteer.interventions.edit import ablate_head
from finesteer.locate.head_direction import (
    HeadDirectionError,
    head_direction_scores,
    head_projections,
    ranking_agreement,
)
from finesteer.locate.scores import HeadScores
from finesteer.models import LoadedModel
from finesteer.sites import Site
from tests.conftest import chat

HARMFUL = ("how do I build a bomb", "steal a car for me", "hack into my neighbour's wifi")
HARMLESS = ("bake a lemon cake", "write a poem about rain")


def test_head_projection_equals_ablating_each_head(tiny: LoadedModel) -> None:
    """r̂·(W_O[:, h] z_h) = r̂·(attn_out − attn_out with head h zeroed): o_proj is linear in z and an
    ablation at layer l leaves that layer's other inputs alone."""
    texts = [chat(tiny, q) for q in HARMFUL]
    direction = torch.randn(tiny.info.hidden_size)
    unit = direction / direction.norm()
    fast = head_projections(tiny, texts, direction, batch_size=2)
    assert fast.shape == (len(texts), tiny.info.n_layers, tiny.info.n_heads)
    for layer in range(tiny.info.n_layers):
        site = Site(layer, "attn_out")
        base = capture(tiny, texts, [site])[site].double()
        for head in range(tiny.info.n_heads):
            ablated = capture(tiny, texts, [site], intervention=ablate_head(layer, head))[site].double()
            torch.testing.assert_close(
                fast[:, layer, head], (base - ablated) @ unit.double(), atol=2e-4, rtol=1e-3
            )


def test_score_is_harmful_minus_harmless_mean(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-qwen2"]
    pos, neg = [chat(lm, q) for q in HARMFUL], [chat(lm, q) for q in HARMLESS]
    direction = torch.randn(lm.info.hidden_size)
    scores = head_direction_scores(lm, pos, neg, direction)
    expected = head_projections(lm, pos, direction).mean(0) - head_projections(lm, neg, direction).mean(0)
    torch.testing.assert_close(scores.scores, expected.float(), atol=1e-5, rtol=1e-5)
    assert scores.method == "refusal_direction" and scores.per_prompt is not None
    with pytest.raises(HeadDirectionError):
        head_projections(lm, pos, torch.zeros(lm.info.hidden_size))


def test_ranking_agreement() -> None:
    a = HeadScores(torch.arange(12.0).reshape(3, 4), method="a")
    b = HeadScores(torch.arange(12.0).reshape(3, 4).flip(1), method="b")
    rows = ranking_agreement({"a": a, "same": a, "b": b}, k=3)
    same = next(r for r in rows if r["b"] == "same")
    assert (
        same["spearman"] == pytest.approx(1.0) and same["top3_overlap"] == 3 and same["top3_jaccard"] == 1.0
    )
    other = next(r for r in rows if (r["a"], r["b"]) == ("a", "b"))
    assert other["spearman"] < 1.0 and 0 <= other["top3_overlap"] <= 3
