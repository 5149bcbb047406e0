"""The one resumable runner: run jobs with stable ids, skipping those a record store already holds.

A job is an id, a `run` function returning its record, and optionally `check(saved)` that refuses
a stored record made with other settings (raising a clear error), so a resume never mixes two
experiments. Records are stored as each job finishes; a rerun after a kill runs only the rest, and
a job's `run` (e.g. fitting a method) is not even called for a stored id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from finesteer.runs.records import Record, RecordError, RecordStore, check_id


@dataclass(frozen=True)
class Job:
    """One unit of a resumable run: `run()` → its record; `check(saved)` raises on a stale record."""

    id: str
    run: Callable[[], Record]
    check: Callable[[Record], None] | None = None


def run_jobs(
    jobs: Sequence[Job],
    store: RecordStore | None = None,
    *,
    on_done: Callable[[str, Record, bool], None] | None = None,
    progress: bool = False,
    desc: str = "jobs",
    unit: str = "job",
) -> dict[str, Record]:
    """Every job's record by id, in job order: stored ones reused (after `check`), the rest run and
    stored one by one. `on_done(id, record, resumed)` follows each job. Without a store nothing is
    kept between runs."""
    ids = [check_id(job.id) for job in jobs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise RecordError(f"job ids must be unique; repeated: {', '.join(repeated)}")
    records: dict[str, Record] = {}
    for job in tqdm(jobs, desc=desc, disable=not progress, unit=unit):
        saved = store.get(job.id) if store is not None else None
        resumed = saved is not None
        if saved is not None:
            if job.check is not None:
                job.check(saved)
            record: Mapping[str, Any] = saved
        else:
            record = job.run()
            if store is not None:
                store.put(job.id, record)
        records[job.id] = record
        if on_done is not None:
            on_done(job.id, record, resumed)
    return records


__all__ = ["Job", "run_jobs"]
