"""Generation evaluations (ASR and the like) as a plan: (condition × prompt batch) jobs.

A condition is a named intervention (or none); the prompts are cut into batches of
`config.batch_size` as `finesteer.evaluate.harness.run_generations` cuts them, and `generation_job`
(the task both backends run) generates and judges one batch exactly as the harness does, returning
its rows. `run_generation_plan` stores each job's rows under its id (`<condition>-b<batch>`) as it
finishes, so a resumed or Ray-run evaluation yields the same rows as an uninterrupted local one;
`asr_rates` (`finesteer.evaluate.asr_rate`) rates them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from finesteer.data.items import Item
from finesteer.evaluate.errors import EvaluationError
from finesteer.evaluate.harness import item_id, item_text, verdict_record
from finesteer.evaluate.verdict import Judge
from finesteer.generation import GenerationConfig, generate
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend, LocalBackend, Worker
from finesteer.runs.records import Record, RecordStore, check_id
from finesteer.runs.runner import Job, run_jobs


@dataclass(frozen=True)
class GenerationJob:
    """One job's payload: a batch of prompts of one condition, and how to generate and judge them."""

    key: str
    indices: tuple[int, ...]
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    formatted: tuple[str, ...]
    config: GenerationConfig
    intervention: Intervention | None
    judges: Mapping[str, Judge]


def generation_job(worker: Worker, job: GenerationJob) -> dict[str, Any]:
    """Generate and judge one batch on a worker holding the model: its rows, as the harness writes them."""
    lm: LoadedModel = worker.state
    config = replace(
        job.config,
        batch_size=len(job.indices),
        seed=None if job.config.seed is None else job.config.seed + job.indices[0],
    )
    responses = generate(lm, list(job.formatted), config, intervention=job.intervention)
    pairs = list(zip(job.texts, responses, strict=True))
    verdicts = {name: judge.judge_many(pairs) for name, judge in job.judges.items()}
    rows = []
    for k, i in enumerate(job.indices):
        row: dict[str, Any] = {"id": job.ids[k], "index": i, "prompt": job.texts[k],
                               "formatted_prompt": job.formatted[k], "response": responses[k]}  # fmt: skip
        if job.judges:
            row["verdicts"] = {name: verdict_record(v[k]) for name, v in verdicts.items()}
        rows.append(row)
    return {"key": job.key, "rows": rows}


def generation_plan(
    lm: LoadedModel,
    items: Sequence[Item],
    conditions: Mapping[str, Intervention | None],
    judges: Mapping[str, Judge],
    *,
    format_fn: Callable[[str], str],
    config: GenerationConfig,
) -> list[Job]:
    """The jobs (condition × prompt batch), ids `<condition>-b<batch>`; checked before generating."""
    if not items:
        raise EvaluationError("no prompts to generate for")
    ids = [item_id(item) for item in items]
    if len(set(ids)) != len(ids):
        raise EvaluationError("item ids must be unique to resume a run")
    texts = [item_text(item) for item in items]
    formatted = [format_fn(text) for text in texts]
    jobs = []
    for name, intervention in conditions.items():
        check_id(name)
        if intervention is not None:
            intervention.validate(lm.info)
        settings = {
            "model": [lm.name, lm.fingerprint], "prompts": formatted, "condition": name,
            "intervention": intervention.digest() if intervention is not None else "none",
            "config": {k: v for k, v in asdict(config).items()},
            "judges": {n: repr(j) if " at 0x" not in repr(j) else type(j).__qualname__
                       for n, j in sorted(judges.items())},
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for b, start in enumerate(range(0, len(items), config.batch_size)):
            span = range(start, min(start + config.batch_size, len(items)))
            payload = GenerationJob(
                key, tuple(span), tuple(ids[i] for i in span), tuple(texts[i] for i in span),
                tuple(formatted[i] for i in span), config, intervention, dict(judges),
            )  # fmt: skip
            job_id = f"{name}-b{b:04d}"
            jobs.append(Job(job_id, payload=payload, check=_checker(key, job_id)))
    return jobs


def _checker(key: str, job_id: str) -> Any:
    def check(saved: Record) -> None:
        if saved.get("key") != key:
            raise EvaluationError(
                f"stored job {job_id} was generated with other prompts, model, intervention, settings or "
                "judges; use another output folder or delete it to start over"
            )

    return check


def run_generation_plan(
    lm: LoadedModel,
    items: Sequence[Item],
    conditions: Mapping[str, Intervention | None],
    judges: Mapping[str, Judge],
    *,
    format_fn: Callable[[str], str],
    config: GenerationConfig,
    backend: Backend | None = None,
    store: RecordStore | None = None,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Every condition's rows in item order, each batch generated by a job on `backend` (default: this
    process) and stored in `store` under its id as it finishes."""
    jobs = generation_plan(lm, items, conditions, judges, format_fn=format_fn, config=config)
    runner = backend if backend is not None else LocalBackend(lm)
    records = run_jobs(jobs, store, backend=runner, task=generation_job, progress=progress,
                       desc="generate (batches)", unit="batch")  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in conditions}
    for job in jobs:
        rows[job.id.rsplit("-b", 1)[0]].extend(records[job.id]["rows"])
    return rows
