"""The library side of the head-ablation commands: run-folder files, typed loaders, ablation planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finesteer.data import DatasetError
from finesteer.data.typed import load_ab_set, load_prompt_set, load_queries
from finesteer.evaluate.ablation import AblationError, AblationSetup, plan_ablation
from finesteer.locate import run_folder
from finesteer.locate.run_folder import RunFolderError


def test_prepare_refuses_a_checkpointed_run_unless_resuming(tmp_path: Path) -> None:
    checkpoint = run_folder.prepare(tmp_path / "run", resume=False)
    assert checkpoint == tmp_path / "run" / run_folder.CHECKPOINT_DIR and (tmp_path / "run").is_dir()
    checkpoint.mkdir()
    (checkpoint / "part").write_text("x")
    with pytest.raises(RunFolderError, match="--resume"):
        run_folder.prepare(tmp_path / "run", resume=False)
    assert run_folder.prepare(tmp_path / "run", resume=True) == checkpoint


def test_prompts_round_trip_and_exclusion(tmp_path: Path) -> None:
    assert run_folder.read_prompts(tmp_path) is None
    assert run_folder.exclude_run_prompts(tmp_path, ["a"], ["1"]) == (["a"], ["1"], 0)
    run_folder.write_prompts(tmp_path, ["How do I  X?", "b"], ["1", "2"])
    assert run_folder.read_prompts(tmp_path) == ["How do I  X?", "b"]
    kept = run_folder.exclude_run_prompts(tmp_path, ["how do i x?", "c", "B"], ["7", "8", "9"])
    assert kept == (["c"], ["8"], 2)
    with pytest.raises(RunFolderError, match="every evaluation prompt"):
        run_folder.exclude_run_prompts(tmp_path, ["b"], ["1"])


def test_run_json_and_scores_folder(tmp_path: Path) -> None:
    assert run_folder.read_run(tmp_path) == {}
    run_folder.write_run(tmp_path, {"mode": "sc", "eps": 0.5})
    assert run_folder.read_run(tmp_path) == {"mode": "sc", "eps": 0.5}
    with pytest.raises(FileNotFoundError, match="no scores"):
        run_folder.scores_folder(tmp_path)
    nested = tmp_path / "steps" / "ships" / "scores"
    nested.mkdir(parents=True)
    (nested / run_folder.SCORES_FILE).write_bytes(b"")
    assert run_folder.scores_folder(tmp_path) == nested


def test_typed_loaders_check_the_item_kind() -> None:
    assert len(load_ab_set("coordinate-other-ais", "generate", 3)) == 3
    with pytest.raises(DatasetError, match="not an A/B set"):
        load_ab_set("advbench", None, 2)
    with pytest.raises(DatasetError, match="is an A/B set"):
        load_prompt_set("coordinate-other-ais", None, 2)
    texts, ids = load_queries("advbench", None, 2)
    assert len(texts) == len(ids) == 2 and all(texts)


def test_plan_ablation_reads_the_run_folder(tmp_path: Path) -> None:
    texts, ids = load_queries("advbench", None, 4)
    run_folder.write_prompts(tmp_path, texts[:1], ids[:1])
    run_folder.write_run(tmp_path, {"mode": "sc", "eps": 0.25})
    (tmp_path / run_folder.SAHARA_FILE).write_text(json.dumps({"group": [[1, 2], [0, 3]]}))
    plan = plan_ablation(AblationSetup(data="advbench", limit=4, from_run=tmp_path))
    assert plan.heads == [(1, 2), (0, 3)] and plan.ks == (1, 2)
    assert (plan.mode, plan.eps) == ("sc", 0.25)
    assert plan.queries == texts[1:] and plan.excluded == 1
    given = plan_ablation(AblationSetup(data="advbench", limit=2, heads="0.1,1.0,1.1", mode="ua", ks=(2,)))
    assert given.heads == [(0, 1), (1, 0), (1, 1)] and given.ks == (2,) and given.eps == 1e-5
    with pytest.raises(AblationError, match="exactly one"):
        plan_ablation(AblationSetup(data="advbench"))
    with pytest.raises(AblationError, match="not supported"):
        plan_ablation(AblationSetup(data="advbench", heads="0.1", eval_kind="kl"))
