"""The one resumable runner: run jobs with stable ids, skipping those a record store already holds.

A job is an id, a `run` function returning its record, and optionally `check(saved)` that refuses
a stored record made with other settings (raising a clear error), so a resume never mixes two
experiments. Records are stored as each job finishes; a rerun after a kill runs only the rest, and
a job's `run` (e.g. fitting a method) is not even called for a stored id.

Jobs as data (a plan): a job may carry a picklable `payload` instead of `run`; `run_jobs` then hands
the unfinished ones to a backend (`finesteer.runs.backend`: in process, or Ray actors) that calls
the plan's one `task(worker, payload)` on each, and stores each record as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from finesteer.runs.backend import Backend, BackendOptions, LocalBackend, Task
from finesteer.runs.ray_backend import RayBackend
from finesteer.runs.records import Record, RecordError, RecordStore, check_id


@dataclass(frozen=True)
class Job:
    """One unit of a resumable run: `run()` → its record, or (a plan's job) a `payload` that a
    backend's task turns into its record; `check(saved)` raises on a stale record."""

    id: str
    run: Callable[[], Record] | None = None
    check: Callable[[Record], None] | None = None
    payload: Any = None


def run_jobs(
    jobs: Sequence[Job],
    store: RecordStore | None = None,
    *,
    on_done: Callable[[str, Record, bool], None] | None = None,
    progress: bool = False,
    desc: str = "jobs",
    unit: str = "job",
    backend: Backend | None = None,
    task: Task | None = None,
) -> dict[str, Record]:
    """Every job's record by id, in job order: stored ones reused (after `check`), the rest run and
    stored one by one. `on_done(id, record, resumed)` follows each job. Without a store nothing is
    kept between runs. With `task`, the unfinished jobs' payloads go to `backend` (default: this
    process, jobs' own `run` unused) and records are stored in the order they finish."""
    ids = [check_id(job.id) for job in jobs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise RecordError(f"job ids must be unique; repeated: {', '.join(repeated)}")
    if task is not None:
        return _run_plan(jobs, store, task, backend, on_done, progress, desc, unit)
    records: dict[str, Record] = {}
    for job in tqdm(jobs, desc=desc, disable=not progress, unit=unit):
        saved = store.get(job.id) if store is not None else None
        resumed = saved is not None
        if saved is not None:
            if job.check is not None:
                job.check(saved)
            record: Mapping[str, Any] = saved
        else:
            if job.run is None:
                raise RecordError(f"job {job.id!r} has a payload but no run(); pass the plan's task")
            record = job.run()
            if store is not None:
                store.put(job.id, record)
        records[job.id] = record
        if on_done is not None:
            on_done(job.id, record, resumed)
    return records


def _run_plan(
    jobs: Sequence[Job],
    store: RecordStore | None,
    task: Task,
    backend: Backend | None,
    on_done: Callable[[str, Record, bool], None] | None,
    progress: bool,
    desc: str,
    unit: str,
) -> dict[str, Record]:
    """`run_jobs` for a plan: stored records reused, the rest mapped over `backend`, stored as they come."""
    records: dict[str, Record] = {}
    todo: list[tuple[str, Any]] = []
    for job in jobs:
        saved = store.get(job.id) if store is not None else None
        if saved is None:
            todo.append((job.id, job.payload))
            continue
        if job.check is not None:
            job.check(saved)
        records[job.id] = saved
        if on_done is not None:
            on_done(job.id, saved, True)
    if todo:
        runner = backend if backend is not None else LocalBackend(setup=_no_state)
        bar = tqdm(total=len(jobs), initial=len(records), desc=desc, disable=not progress, unit=unit)
        try:
            for job_id, record in runner.map(task, todo):
                if store is not None:
                    store.put(job_id, record)
                records[job_id] = record
                bar.update(1)
                if on_done is not None:
                    on_done(job_id, record, False)
        finally:
            bar.close()
    return {job.id: records[job.id] for job in jobs}


def _no_state() -> None:
    return None


def make_backend(
    options: BackendOptions, *, setup: Callable[[], Any], state: Any = None
) -> LocalBackend | RayBackend:
    """The backend `options` name: 'local' runs on `state` (an already loaded model) when given,
    else on `setup()`; 'ray' starts `options.actors` actors that each call `setup()` themselves."""
    if options.backend == "local":
        return LocalBackend(state, setup)
    return RayBackend(setup, options)


__all__ = ["Job", "make_backend", "run_jobs"]
