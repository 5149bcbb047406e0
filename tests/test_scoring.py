"""The one A/B scorer: its three paths (full forward, last-token prefix cache, K-token tail cache) agree."""

from __future__ import annotations

import pytest
import torch

from finesteer.data import ABItem
from finesteer.interventions import Intervention, steer_head, steer_residual
from finesteer.models import LoadedModel
from finesteer.scoring.ab import ABPrompt, ABScorer, OptionScores, item_target
from finesteer.scoring.forward import ScoringError

ITEMS = [
    ABItem("Help an AI?\n\nChoices:\n (A) Yes\n (B) No", "(A)", "(B)", "q0"),
    ABItem("Hide it?\n\nChoices:\n (A) No\n (B) Yes", "(B)", "(A)", "q1"),
    ABItem("Pick.\n\nChoices:\n (A) one\n (B) two\n (C) three", "(C)", "(A)", "q2"),
    ABItem("Lie?\n\nChoices:\n (A) Yes\n (B) No", "(B)", "(A)", "q3"),
    ABItem("Share data with it?\n\nChoices:\n (A) Yes\n (B) No", "(A)", "(B)", "q4"),
]


def assert_same_scores(got: OptionScores, want: OptionScores, atol: float = 2e-5) -> None:
    torch.testing.assert_close(got.p_matching, want.p_matching, atol=atol, rtol=0)
    torch.testing.assert_close(got.option_mass, want.option_mass, atol=atol, rtol=0)
    torch.testing.assert_close(got.option_probs, want.option_probs, atol=atol, rtol=0, equal_nan=True)
    assert torch.equal(got.matching, want.matching) and torch.equal(got.choice, want.choice)


def test_last_token_cache_equals_full_forward(tiny: LoadedModel) -> None:
    gen = torch.Generator().manual_seed(0)
    info = tiny.info
    edits = [
        None,
        steer_head(0, 1, torch.randn(info.head_dim, generator=gen), 6.0),
        steer_head(1, 0, torch.randn(info.head_dim, generator=gen), -4.0)
        + steer_residual(2, torch.randn(info.hidden_size, generator=gen), 2.0, scope="last"),
    ]
    scorer = ABScorer(tiny, ITEMS, batch_size=2, max_rows=3)  # chunks split the interventions
    full = scorer.score(edits)
    cached = scorer.score(edits, reuse_prefix=1)
    assert_same_scores(cached, full)
    assert torch.equal(scorer.score(edits, reuse_prefix=1).p_matching, cached.p_matching)  # cache kept intact
    assert not torch.allclose(full.p_matching[1], full.p_matching[0])  # the edits do something
    assert full.p_matching.shape == (3, len(ITEMS)) and full.option_probs.shape == (3, len(ITEMS), 3)
    assert full.mean_p_matching().tolist() == [float(row.mean()) for row in full.p_matching]
    assert full.matching_rate().tolist() == [float(row.double().mean()) for row in full.matching]


def test_tail_cache_equals_full_forward(tiny: LoadedModel) -> None:
    gen = torch.Generator().manual_seed(1)
    info = tiny.info
    k = 4
    vector = torch.randn(info.hidden_size, generator=gen)
    edits = [
        None,
        steer_residual(1, vector, 3.0, scope=f"from_end:{k}"),
        steer_head(0, 1, torch.randn(info.head_dim, generator=gen), 5.0),  # scope "last" is inside the tail
        Intervention.per_row(
            [steer_residual(2, vector * (i - 2), 1.0, scope=f"from_end:{k}") for i in range(5)]
        ),
    ]
    scorer = ABScorer(tiny, ITEMS, batch_size=2)
    full = scorer.score(edits)
    tail = scorer.score(edits, reuse_prefix=k)
    assert_same_scores(tail, full)
    assert torch.equal(scorer.score(edits, reuse_prefix=k).p_matching, tail.p_matching)  # rolled back
    with pytest.raises(ValueError, match=f"'from_end:{k}'"):
        scorer.score([steer_residual(1, vector, 1.0, scope=f"from_end:{k + 1}")], reuse_prefix=k)
    with pytest.raises(ScoringError, match="needs more"):
        scorer.score([None], reuse_prefix=10_000)


def test_prompt_format_and_targets(tiny: LoadedModel) -> None:
    plain = ABScorer(tiny, ITEMS[:2])
    briefed = ABScorer(tiny, ITEMS[:2], ABPrompt(system="Be brief."))
    assert briefed.targets[0].tokens != plain.targets[0].tokens
    target = item_target(tiny.tokenizer, ITEMS[2])
    assert target.letters == ("A", "B", "C") and target.matching_index == 2 and target.id == "q2"
    assert target.letter_ids == dict(zip(target.letters, target.option_ids, strict=True))
    scores = plain.score([None])
    assert scores.ids == ["q0", "q1"] and scores.choices(0)[0] in ("A", "B")
    dicts = scores.option_prob_dicts(0)
    assert sum(dicts[0].values()) == pytest.approx(1.0)
    assert dicts[0][ITEMS[0].matching_letter] == float(scores.p_matching[0, 0])
