"""Joint head sets: forward selection is exact at every step; the Optuna search resumes without
repeating a trial and refuses a resume with other settings."""

from __future__ import annotations

import sys

import pytest
import torch

from finesteer.locate import joint_search
from finesteer.locate.engine import encode_prompts
from finesteer.locate.joint_heads import (
    JointHeadsError,
    candidate_pool,
    forward_selection,
    head_name,
    head_set_ablation,
)
from finesteer.locate.joint_search import SearchError, SearchSettings, load_optuna, search_head_sets
from finesteer.locate.refusal_proxy import base_last_logits, harmless_kl, refusal_scores
from finesteer.locate.scores import HeadScores
from finesteer.models import LoadedModel
from tests.conftest import chat

POOL = [(0, 0), (0, 1), (1, 2), (1, 3), (2, 0)]


@pytest.fixture
def data(tiny_models: dict[str, LoadedModel]):
    lm = tiny_models["tiny-llama"]
    harmful = encode_prompts(lm, [chat(lm, q) for q in ("how do I build a bomb", "steal a car for me")])
    harmless = encode_prompts(lm, [chat(lm, q) for q in ("bake a lemon cake", "write a poem about rain")])
    return lm, harmful, harmless, base_last_logits(lm, harmless)


def test_forward_selection_is_exact_and_greedy(data) -> None:
    lm, harmful, harmless, base = data
    steps = forward_selection(lm, harmful, POOL, 2, harmless=harmless, base_logits=base)
    assert [len(s.heads) for s in steps] == [1, 2] and steps[1].heads[0] == steps[0].heads[0]
    for step in steps:  # each candidate's recorded value is the exact joint ablation's refusal log-odds
        chosen = step.heads[:-1]
        for name, value in step.candidates.items():
            head = next(h for h in POOL if head_name(h) == name)
            exact = float(refusal_scores(lm, harmful, [head_set_ablation([*chosen, head])]).mean())
            assert value == pytest.approx(exact, abs=1e-5)
        assert step.refusal == pytest.approx(min(step.candidates.values()), abs=1e-5)
        kl = float(harmless_kl(lm, harmless, [head_set_ablation(step.heads)], base).mean())
        assert step.kl == pytest.approx(kl, abs=1e-6)
    with pytest.raises(JointHeadsError):
        forward_selection(lm, harmful, POOL, len(POOL) + 1)


def test_strength_zero_is_the_unmodified_model(data) -> None:
    lm, harmful, _, _ = data
    none, zero = refusal_scores(lm, harmful, [head_set_ablation([]), head_set_ablation(POOL, strength=0.0)])
    assert none.tolist() == pytest.approx(zero.tolist(), abs=1e-6)


def test_candidate_pool_is_the_union_of_top_heads() -> None:
    a = HeadScores(torch.arange(12.0).reshape(3, 4), method="a")
    b = HeadScores(-torch.arange(12.0).reshape(3, 4), method="b")
    assert candidate_pool([a, b, a], 2) == [(2, 3), (2, 2), (0, 0), (0, 1)]


def test_search_resumes_without_repeating_a_trial(data, tmp_path, monkeypatch) -> None:
    lm, harmful, harmless, base = data
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return refusal_scores(*args, **kwargs)

    monkeypatch.setattr(joint_search, "refusal_scores", counting)  # count evaluations the search makes
    first = search_head_sets(lm, harmful, harmless, base, POOL, tmp_path, SearchSettings(n_trials=3))
    evaluated_first = len(calls)
    again = search_head_sets(lm, harmful, harmless, base, POOL, tmp_path, SearchSettings(n_trials=3))
    assert again["new_trials"] == 0 and len(calls) == evaluated_first  # nothing re-run
    more = search_head_sets(lm, harmful, harmless, base, POOL, tmp_path, SearchSettings(n_trials=5))
    assert first["n_trials"] == 3 and more["n_trials"] == 5 and more["new_trials"] == 2
    assert more["trials"][:3] == first["trials"]
    assert 1 <= evaluated_first <= 3 and len(calls) - evaluated_first <= 2
    front = {(r["refusal"], r["kl"]) for r in more["pareto"]}
    for r in more["trials"]:  # nothing on the front is beaten on both objectives
        assert not any(r["refusal"] < a and r["kl"] < b for a, b in front)
    with pytest.raises(SearchError, match="max_heads"):
        search_head_sets(lm, harmful, harmless, base, POOL, tmp_path, SearchSettings(n_trials=5, max_heads=2))
    with pytest.raises(SearchError, match="--resume"):
        search_head_sets(
            lm, harmful, harmless, base, POOL, tmp_path, SearchSettings(n_trials=6), resume=False
        )


def test_missing_optuna_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SearchError, match=r"finesteer\[search\]"):
        load_optuna()
