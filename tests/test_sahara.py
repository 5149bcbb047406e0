from __future__ import annotations

import pytest
import torch

from finesteer.locate.engine import encode_prompts
from finesteer.locate.sahara import sahara
from finesteer.locate.scan import LastHidden, scan
from finesteer.locate.ships import ablation, format_queries, ships_dataset, subspace_angle_score
from finesteer.models import LoadedModel

QUERIES = ("how do I make a weapon", "hello there, friend", "tell me a secret now please", "x y")


@pytest.fixture
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-mistral"]  # GQA, 8 heads × 3 layers


def test_group_never_repeats_a_head_and_follows_the_greedy_rule(lm):
    prompts = encode_prompts(lm, format_queries(lm, QUERIES))
    pool = [(0, 1), (1, 3), (2, 0), (2, 5), (1, 7)]
    result = sahara(lm, prompts, group_size=5, mode="ua", candidates=pool, batch_size=4, progress=False)
    assert sorted(result.group) == sorted(pool)  # all five, each once
    for step, chosen in enumerate(result.steps):
        assert chosen.head not in result.group[:step]
        assert set(chosen.candidate_scores) == set(pool) - set(result.group[:step])
        assert chosen.score == max(chosen.candidate_scores.values())
    # The step-2 score is the subspace angle of ablating the first two heads together.
    base = scan(lm, prompts, [ablation([], "ua")], LastHidden(), progress=False)[0]
    both = scan(lm, prompts, [ablation(result.group[:2], "ua")], LastHidden(), progress=False)[0]
    assert result.steps[1].score == pytest.approx(subspace_angle_score(base, both), abs=1e-4)


def test_first_step_is_dataset_level_ships(lm):
    prompts = encode_prompts(lm, format_queries(lm, QUERIES))
    result = sahara(lm, prompts, group_size=1, mode="sc", batch_size=4, progress=False)
    table = ships_dataset(lm, prompts, mode="sc", batch_size=4, progress=False)
    torch.testing.assert_close(result.step_scores(lm, 0).scores, table.scores, atol=1e-4, rtol=1e-4)
    assert result.group == [table.top_heads(1)[0]]


def test_resume_continues_at_the_interrupted_step(lm, tmp_path):
    prompts = encode_prompts(lm, format_queries(lm, QUERIES))
    pool = [(0, 0), (0, 3), (1, 2), (2, 6)]
    reference = sahara(lm, prompts, group_size=3, candidates=pool, batch_size=4, progress=False)
    seen: list[int] = []

    def interrupt_in_step_two(index: int) -> None:
        seen.append(index)
        if len(seen) == len(pool) + 1:  # first candidate of step 2 finished
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sahara(
            lm,
            prompts,
            group_size=3,
            candidates=pool,
            batch_size=4,
            checkpoint=tmp_path,
            checkpoint_every=1,
            progress=False,
            on_candidate=interrupt_in_step_two,
        )
    assert (tmp_path / "sahara.json").is_file()
    rerun: list[int] = []
    resumed = sahara(
        lm,
        prompts,
        group_size=3,
        candidates=pool,
        batch_size=4,
        checkpoint=tmp_path,
        progress=False,
        on_candidate=rerun.append,
    )
    # Step 1 is not rerun; step 2 skips its finished first candidate; step 3 runs its 2 candidates.
    assert rerun == [1, 2, 0, 1]
    assert resumed.group == reference.group
    assert [s.score for s in resumed.steps] == pytest.approx([s.score for s in reference.steps])


def test_bad_arguments(lm):
    prompts = format_queries(lm, QUERIES)
    with pytest.raises(ValueError, match="group_size"):
        sahara(lm, prompts, group_size=3, candidates=[(0, 0), (0, 1)], progress=False)
    with pytest.raises(ValueError, match="unknown head"):
        sahara(lm, prompts, group_size=1, candidates=[(0, 8)], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        sahara(lm, prompts, group_size=1, candidates=[(0, 1), (0, 1)], progress=False)
    with pytest.raises(ValueError, match="mode"):
        sahara(lm, prompts, group_size=1, mode="xx", candidates=[(0, 1)], progress=False)
