"""`--backend ray` on a local Ray instance (`python -m pytest -m ray`; skipped where Ray is not installed).

For a Ships scan, an attribution verification, an HSI sweep and an ASR evaluation: Ray actors give the
byte-identical table of the local backend; an actor killed mid-run (by its own PID) is restarted and
its jobs retried, with the same table; a driver stopped after k stored jobs resumes with only the
missing jobs. One Ray instance (2 CPUs) and one pair of model-holding actors serve the whole module.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.models import LoadedModel, load_model
from finesteer.runs.backend import BackendOptions, LocalBackend
from tests import plan_cases

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'finesteer[ray]'")
pytestmark = pytest.mark.ray

from finesteer.runs.ray_backend import RayBackend  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def actors(cluster: None) -> Iterator[RayBackend]:
    # half a CPU each: the CLI test's own two actors fit beside them on the 2-CPU instance
    backend = RayBackend(partial(load_model, "tiny-llama"), BackendOptions("ray", actors=2, num_cpus=0.5))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


@pytest.mark.parametrize("case", sorted(plan_cases.CASES))
def test_ray_table_is_the_local_table_even_when_an_actor_dies(
    lm: LoadedModel, actors: RayBackend, tmp_path: Path, case: str
) -> None:
    run = plan_cases.CASES[case]
    local = run(lm, LocalBackend(lm), tmp_path / "local")
    assert run(lm, actors, tmp_path / "ray") == local

    before = actors.pids()
    killed: list[int] = []

    def kill_one(done: int) -> None:  # after the first job: kill an actor, by its own PID, mid-run
        if done == 1:
            os.kill(before[0], signal.SIGKILL)
            killed.append(before[0])

    assert run(lm, plan_cases.Counting(actors, hook=kill_one), tmp_path / "killed") == local
    assert killed and killed[0] not in actors.pids()  # restarted: a new process took its jobs
    assert plan_cases.job_count(case, tmp_path / "killed") == plan_cases.job_count(case, tmp_path / "local")


@pytest.mark.parametrize("case", sorted(plan_cases.CASES))
def test_a_killed_ray_driver_resumes_only_the_missing_jobs(
    lm: LoadedModel, actors: RayBackend, tmp_path: Path, case: str
) -> None:
    run = plan_cases.CASES[case]
    local = run(lm, LocalBackend(lm), tmp_path / "local")
    total = plan_cases.job_count(case, tmp_path / "local")
    with pytest.raises(plan_cases.Interrupted):
        run(lm, plan_cases.Counting(actors, stop_after=3), tmp_path / "ray")
    stored = plan_cases.job_count(case, tmp_path / "ray")
    assert stored == 3
    again = plan_cases.Counting(actors)
    assert run(lm, again, tmp_path / "ray") == local
    assert again.submitted == total - stored  # only the missing jobs were recomputed
    assert plan_cases.job_count(case, tmp_path / "ray") == total


def test_cli_ships_on_ray_prints_the_local_table(cluster: None, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["locate", "ships", "tiny-llama", "--data", "advbench", "--limit", "3", "--batch-size", "2",
            "--num-cpus", "0.5", "--json"]  # fmt: skip
    outputs = []
    for backend in ("local", "ray"):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / backend), "--backend", backend])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    local, on_ray = outputs
    assert on_ray["top_heads"] == local["top_heads"] and on_ray["backend"] == "ray"
    tables = [load_file(str(tmp_path / backend / "scores.safetensors")) for backend in ("local", "ray")]
    assert tables[0].keys() == tables[1].keys()
    assert all(tables[0][k].numpy().tobytes() == tables[1][k].numpy().tobytes() for k in tables[0])
