"""Jobs as data, in process: each plan equals today's path, and a killed run resumes without repeating
or losing a job (the Ray backend's tests, `-m ray`, reuse these cases: tests/plan_cases.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finesteer.data.items import PromptItem
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.asr_plan import run_generation_plan
from finesteer.evaluate.harness import run_generations
from finesteer.evaluate.judges import KeywordRefusalJudge
from finesteer.generation import GenerationConfig
from finesteer.locate.attribution.metrics import KLDivergence
from finesteer.locate.attribution.prerank import exact_effects
from finesteer.locate.hsi import sweep_heads
from finesteer.locate.ships import ships_scores
from finesteer.locate.ships_plan import run_ships_plan, ships_plan
from finesteer.locate.verify_plan import run_verification
from finesteer.models import LoadedModel
from finesteer.runs.backend import BackendError, BackendOptions, LocalBackend, record_tensor, tensor_record
from finesteer.runs.records import RecordError
from finesteer.runs.runner import Job, run_jobs
from tests import plan_cases


@pytest.fixture(scope="module")
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


@pytest.mark.parametrize("engine", ["fast", "simple"])
def test_ships_plan_equals_the_scan_bit_for_bit(lm: LoadedModel, engine: str) -> None:
    prompts = plan_cases.prompts(lm)
    kwargs = {"levels": ("query", "dataset"), "batch_size": 2, "engine": engine, "progress": False}
    old = ships_scores(lm, prompts, **kwargs)
    new = run_ships_plan(lm, prompts, **kwargs)
    for level in ("query", "dataset"):
        assert torch.equal(old[level].scores, new[level].scores)
    assert torch.equal(old["query"].per_prompt, new["query"].per_prompt)


def test_ships_plan_ids_are_stable_and_cover_every_batch_and_layer(lm: LoadedModel) -> None:
    plan = ships_plan(lm, plan_cases.prompts(lm), batch_size=2, layers_per_job=2)
    again = ships_plan(lm, plan_cases.prompts(lm), batch_size=2, layers_per_job=2)
    assert [j.id for j in plan.jobs] == [j.id for j in again.jobs]
    n_batches, n_blocks = 3, -(-lm.info.n_layers // 2)
    assert len(plan.jobs) == n_batches * n_blocks and plan.jobs[0].id == "b0000-l000-001"
    assert sorted(r for j in plan.jobs[::n_blocks] for r in j.payload.rows) == list(range(5))


def test_verification_plan_equals_exact_effects(lm: LoadedModel) -> None:
    heads = [(1, 2), (0, 1), (1, 0)]
    want = exact_effects(lm, plan_cases.prompts(lm), KLDivergence(), heads, batch_size=2)
    got = run_verification(lm, plan_cases.prompts(lm), KLDivergence(), heads, batch_size=2, heads_per_job=3)
    assert torch.equal(want, got)


def test_hsi_plan_equals_the_in_process_sweep(lm: LoadedModel, tmp_path: Path) -> None:
    from finesteer.activations.directions import fit_head_directions

    directions = fit_head_directions(lm, plan_cases.AB_ITEMS[:3])
    kwargs = {"heads": [(0, 0), (1, 1), (2, 2)], "batch_size": 2, "progress": False}
    old = sweep_heads(lm, plan_cases.AB_ITEMS[2:], directions, (2.0, 4.0), **kwargs)
    new = sweep_heads(lm, plan_cases.AB_ITEMS[2:], directions, (2.0, 4.0), run_dir=tmp_path,
                      backend=LocalBackend(lm), **kwargs)  # fmt: skip
    assert old.per_item.numpy().tobytes() == new.per_item.numpy().tobytes()  # NaN where not swept
    assert torch.equal(old.baseline_p_matching, new.baseline_p_matching)
    assert (tmp_path / "sweep" / "jobs.jsonl").is_file() and (tmp_path / "sweep.safetensors").is_file()


def test_generation_plan_rows_equal_the_harness_rows(lm: LoadedModel) -> None:
    items = [PromptItem(q, str(i)) for i, q in enumerate(plan_cases.QUERIES)]
    judges = {"keyword": KeywordRefusalJudge.ships()}
    config = GenerationConfig(max_new_tokens=5, batch_size=2)

    def fmt(text: str) -> str:
        return chat_prompt(lm.tokenizer, text)

    old = run_generations(lm, items, None, format_fn=fmt, config=config, judges=judges, progress=False)
    new = run_generation_plan(lm, items, {"c": None}, judges, format_fn=fmt, config=config, progress=False)
    assert new["c"] == old


@pytest.mark.parametrize("case", sorted(plan_cases.CASES))
def test_a_killed_run_resumes_only_the_missing_jobs(lm: LoadedModel, tmp_path: Path, case: str) -> None:
    run = plan_cases.CASES[case]
    whole = run(lm, LocalBackend(lm), tmp_path / "whole")
    total = plan_cases.job_count(case, tmp_path / "whole")
    stopped = plan_cases.Counting(LocalBackend(lm), stop_after=2)
    with pytest.raises(plan_cases.Interrupted):
        run(lm, stopped, tmp_path / "resumed")
    assert plan_cases.job_count(case, tmp_path / "resumed") == 2
    again = plan_cases.Counting(LocalBackend(lm))
    assert run(lm, again, tmp_path / "resumed") == whole
    assert again.submitted == total - 2  # only the missing jobs ran
    assert plan_cases.job_count(case, tmp_path / "resumed") == total  # no row repeated or lost


def test_a_store_from_other_settings_is_refused(lm: LoadedModel, tmp_path: Path) -> None:
    from finesteer.locate.engine import ScanError
    from finesteer.runs.records import JsonlRecords

    store = JsonlRecords(tmp_path / "jobs.jsonl")
    run_ships_plan(lm, plan_cases.prompts(lm), batch_size=2, store=store, progress=False)
    with pytest.raises(ScanError, match="another scan"):
        run_ships_plan(lm, plan_cases.prompts(lm), eps=0.1, batch_size=2, store=store, progress=False)


def test_tensor_fields_round_trip_exactly() -> None:
    for tensor in (torch.randn(3, 4, dtype=torch.float64), torch.rand(2, 5) > 0.5, torch.zeros(0, 2)):
        assert torch.equal(record_tensor(tensor_record(tensor)), tensor)


def test_payload_jobs_need_a_task_and_options_are_checked() -> None:
    with pytest.raises(RecordError, match="task"):
        run_jobs([Job("a", payload=1)])
    assert run_jobs([Job("a", payload=2)], task=lambda worker, p: {"v": p * 3})["a"] == {"v": 6}
    with pytest.raises(BackendError, match="--backend"):
        BackendOptions("slurm")
    with pytest.raises(BackendError, match="num-cpus"):
        BackendOptions("ray", num_cpus=0)
    assert BackendOptions("ray", num_cpus=3).actor_threads == 3


def test_import_finesteer_does_not_import_ray() -> None:
    import subprocess
    import sys

    code = "import sys, finesteer, finesteer.runs.runner, finesteer.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backend_ray_without_ray_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from finesteer.runs.ray_backend import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(BackendError, match=r"finesteer\[ray\]"):
        import_ray()
