"""Attribution verification as a plan: the exact single-head ablations of a head list, in
(prompt batch × head chunk) jobs run in process or on Ray actors.

Each job calls the attribution's public `exact_effects` on one prompt batch (batched as the scan
batches prompts) and a chunk of heads, with that batch's unablated logits computed once per worker
(memo). `run_verification` stores each job's [heads, prompts] block under its id
(`b<batch>-h<first>`) and assembles the [len(heads), P] table `exact_effects` returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from finesteer.errors import check_count
from finesteer.locate.attribution.metrics import Metric
from finesteer.locate.attribution.prerank import exact_effects
from finesteer.locate.engine import EncodedPrompts, ScanError, as_encoded
from finesteer.locate.ships import DEFAULT_EPS, ablation, base_logits
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend, LocalBackend, Worker, record_tensor, tensor_record
from finesteer.runs.records import Record, RecordStore
from finesteer.runs.runner import Job, run_jobs
from finesteer.sites import Head, check_heads


@dataclass(frozen=True)
class VerifyJob:
    """One job's payload: a prompt batch (ids in scan order, their prompt indices) and a head chunk."""

    key: str
    batch: int
    rows: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...]
    heads: tuple[Head, ...]
    metric: Metric
    mode: str
    eps: float
    engine: str
    batch_size: int


def verify_job(worker: Worker, job: VerifyJob) -> dict[str, Any]:
    """The exact effects [chunk heads, batch prompts] of one job, on a worker holding the model."""
    lm: LoadedModel = worker.state
    encoded = EncodedPrompts(job.ids, f"{job.key}:{job.batch}")
    memo_key = f"verify:{job.key}:{job.batch}"
    if memo_key not in worker.memo:
        worker.memo.pop(next((k for k in worker.memo if k.startswith("verify:")), ""), None)
        worker.memo[memo_key] = base_logits(lm, encoded, batch_size=job.batch_size)
    values = exact_effects(
        lm, encoded, job.metric, list(job.heads), mode=job.mode, eps=job.eps, batch_size=job.batch_size,
        engine=job.engine, base_logits=worker.memo[memo_key],
    )  # fmt: skip
    return {"key": job.key, "values": tensor_record(values)}


def verification_plan(
    lm: LoadedModel,
    encoded: EncodedPrompts,
    metric: Metric,
    heads: Sequence[Head],
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    engine: str = "fast",
    heads_per_job: int = 8,
) -> list[Job]:
    """The deterministic job list of one verification; every setting checked before any forward."""
    heads = check_heads(heads, lm.info.n_layers, lm.info.n_heads)
    if not heads:
        raise ScanError("no heads to verify")
    check_count(batch_size, "batch_size")
    check_count(heads_per_job, "heads_per_job")
    ablation(heads[:1], mode, eps)
    settings = [lm.name, lm.fingerprint, encoded.texts_hash, metric.key(), heads, mode, eps, engine]
    settings.append(batch_size)
    key = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:16]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded.ids[i]), i))  # as prompt_batches
    jobs = []
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = tuple(order[start : start + batch_size])
        ids = tuple(encoded.ids[r] for r in rows)
        for first in range(0, len(heads), heads_per_job):
            chunk = tuple(heads[first : first + heads_per_job])
            payload = VerifyJob(key, b, rows, ids, chunk, metric, mode, eps, engine, batch_size)
            job_id = f"b{b:04d}-h{first:04d}"
            jobs.append(Job(job_id, payload=payload, check=_checker(key, job_id)))
    return jobs


def _checker(key: str, job_id: str) -> Any:
    def check(saved: Record) -> None:
        if saved.get("key") != key:
            raise ScanError(
                f"stored job {job_id} verified other heads, prompts or settings; use another --out"
            )

    return check


def run_verification(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    metric: Metric,
    heads: Sequence[Head],
    *,
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    engine: str = "fast",
    heads_per_job: int = 8,
    backend: Backend | None = None,
    store: RecordStore | None = None,
    progress: bool = False,
) -> Tensor:
    """`exact_effects(lm, prompts, metric, heads, …)` [len(heads), P], as plan jobs on `backend`
    (default: this process), each stored in `store` as it finishes."""
    encoded = as_encoded(lm, prompts)
    jobs = verification_plan(lm, encoded, metric, heads, mode=mode, eps=eps, batch_size=batch_size,
                             engine=engine, heads_per_job=heads_per_job)  # fmt: skip
    runner = backend if backend is not None else LocalBackend(lm)
    records = run_jobs(jobs, store, backend=runner, task=verify_job, progress=progress, desc="verify jobs")
    out: Tensor | None = None
    for job in jobs:
        payload: VerifyJob = job.payload
        part = record_tensor(records[job.id]["values"])
        if out is None:
            out = part.new_zeros((len(heads), len(encoded)))
        first = int(job.id.rsplit("-h", 1)[1])
        out[first : first + part.shape[0], list(payload.rows)] = part
    assert out is not None
    return out
