"""The Ships scan as a plan: (prompt batch × layer block) jobs, run in process or on Ray actors.

`ships_plan` cuts `ships_scores`' scan into jobs with stable ids, `b<batch>-l<first>-<last>`: the
prompts are batched exactly as the scan batches them (longest first, `batch_size` per forward), and
each job ablates every head of a block of layers, one at a time, on one batch. `ships_job` (the task
both backends run) computes the batch's unablated logits/hidden states once per worker (kept in
its memo) and runs the chosen engine on that batch. `run_ships_plan` stores each job's record under
its id (`finesteer.runs.runner.run_jobs`) and assembles the same `HeadScores` tables as
`ships_scores` from the records, so a table is the same whichever backend, actor or resume made
each row.

Cost (the FLOP estimate of a scan): one forward of the prompts per head, i.e. about
2 · n_params · n_tokens · n_layers · n_heads FLOPs with the simple engine; the fast engine reuses the
layers before each head, roughly halving it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from finesteer.errors import check_count
from finesteer.locate.engine import EncodedPrompts, ScanError, as_encoded
from finesteer.locate.fast_scan import run_scan
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import DEFAULT_EPS, ablation, level_scores, ships_readout
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend, LocalBackend, Worker, record_tensor, tensor_record
from finesteer.runs.records import Record, RecordStore
from finesteer.runs.runner import Job, run_jobs


@dataclass(frozen=True)
class ShipsJob:
    """One job's payload: a prompt batch (ids in scan order, their prompt indices) and a layer block."""

    plan: str
    batch: int
    rows: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...]
    layers: tuple[int, ...]
    levels: tuple[str, ...]
    mode: str
    eps: float
    engine: str
    batch_size: int


@dataclass(frozen=True)
class ShipsPlan:
    """The jobs of one Ships scan and what assembling them needs."""

    key: str
    jobs: tuple[Job, ...]
    levels: tuple[str, ...]
    n_prompts: int


def _plan_key(lm: LoadedModel, encoded: EncodedPrompts, settings: dict[str, Any]) -> str:
    """Names the scan a record belongs to: model, prompts and settings (a resume checks it)."""
    blob = json.dumps([lm.name, lm.fingerprint, encoded.texts_hash, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ships_plan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    *,
    levels: Sequence[str] = ("query",),
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    engine: str = "fast",
    layers_per_job: int = 1,
) -> ShipsPlan:
    """The deterministic job list of a Ships scan (see the module doc); checked before any forward."""
    levels = tuple(dict.fromkeys(levels))
    if not levels or any(level not in ("query", "dataset") for level in levels):
        raise ScanError(f"levels must be 'query' and/or 'dataset', got {levels}")
    check_count(batch_size, "batch_size")
    check_count(layers_per_job, "layers_per_job")
    ablation([(0, 0)], mode, eps)  # mode and ε checked
    encoded = as_encoded(lm, prompts)
    settings = {"levels": levels, "mode": mode, "eps": eps, "engine": engine, "batch_size": batch_size}
    key = _plan_key(lm, encoded, settings)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded.ids[i]), i))  # as prompt_batches
    n_layers = lm.info.n_layers
    jobs = []
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = tuple(order[start : start + batch_size])
        ids = tuple(encoded.ids[r] for r in rows)
        for first in range(0, n_layers, layers_per_job):
            layers = tuple(range(first, min(first + layers_per_job, n_layers)))
            payload = ShipsJob(key, b, rows, ids, layers, levels, mode, eps, engine, batch_size)
            job_id = f"b{b:04d}-l{layers[0]:03d}-{layers[-1]:03d}"
            jobs.append(Job(job_id, payload=payload, check=_checker(key, job_id)))
    return ShipsPlan(key, tuple(jobs), levels, len(encoded))


def _checker(key: str, job_id: str) -> Any:
    def check(saved: Record) -> None:
        if saved.get("plan") != key:
            raise ScanError(
                f"stored job {job_id} belongs to another scan (model, prompts or settings differ); "
                "use another --out or delete it"
            )

    return check


def ships_job(worker: Worker, job: ShipsJob) -> dict[str, Any]:
    """One job on a worker holding the model: the batch's readout of every head of the block.

    The batch's unablated logits / hidden states are computed once per worker and batch (memo).
    """
    lm: LoadedModel = worker.state
    encoded = EncodedPrompts(job.ids, f"{job.plan}:{job.batch}")
    memo_key = f"ships:{job.plan}:{job.batch}"
    if memo_key not in worker.memo:
        worker.memo.pop(next((k for k in worker.memo if k.startswith("ships:")), ""), None)
        worker.memo[memo_key] = ships_readout(lm, encoded, job.levels, job.batch_size)
    readout, base = worker.memo[memo_key]
    heads = [(layer, head) for layer in job.layers for head in range(lm.info.n_heads)]
    candidates = [ablation([h], job.mode, job.eps) for h in heads]
    values = run_scan(
        lm, encoded, candidates, readout, engine=job.engine, batch_size=job.batch_size, progress=False
    )
    record: dict[str, Any] = {"plan": job.plan, "values": tensor_record(values)}
    if base is not None:
        record["base_hidden"] = tensor_record(base)
    return record


def assemble_values(plan: ShipsPlan, records: dict[str, Record]) -> tuple[Tensor, Tensor | None]:
    """The scan's [heads, prompts, …] values (and base hidden states) from the plan's records."""
    values: Tensor | None = None
    base: Tensor | None = None
    for job in plan.jobs:
        payload: ShipsJob = job.payload
        part = record_tensor(records[job.id]["values"])  # [block heads, batch prompts, …]
        n_heads = part.shape[0] // len(payload.layers)
        if values is None:
            n_layers = plan.jobs[-1].payload.layers[-1] + 1
            values = part.new_zeros((n_layers * n_heads, plan.n_prompts, *part.shape[2:]))
        start = payload.layers[0] * n_heads
        values[start : start + part.shape[0], list(payload.rows)] = part
        if "base_hidden" in records[job.id]:
            hidden = record_tensor(records[job.id]["base_hidden"])
            if base is None:
                base = hidden.new_zeros((plan.n_prompts, *hidden.shape[1:]))
            base[list(payload.rows)] = hidden
    assert values is not None
    return values, base


def run_ships_plan(
    lm: LoadedModel,
    prompts: EncodedPrompts | Sequence[str],
    *,
    levels: Sequence[str] = ("query",),
    mode: str = "ua",
    eps: float = DEFAULT_EPS,
    r_main: int = 1,
    batch_size: int = 8,
    engine: str = "fast",
    layers_per_job: int = 1,
    backend: Backend | None = None,
    store: RecordStore | None = None,
    progress: bool = True,
) -> dict[str, HeadScores]:
    """`ships_scores` run as a plan on `backend` (default: this process, on `lm`), each job's record
    stored in `store` as it finishes (a rerun on the same store runs only the missing jobs)."""
    started = time.perf_counter()
    encoded = as_encoded(lm, prompts)
    plan = ships_plan(lm, encoded, levels=levels, mode=mode, eps=eps, batch_size=batch_size,
                      engine=engine, layers_per_job=layers_per_job)  # fmt: skip
    if "dataset" in plan.levels and not 1 <= r_main <= len(encoded):
        raise ScanError(f"r_main={r_main} needs 1 ≤ r_main ≤ number of prompts ({len(encoded)})")
    local = backend if backend is not None else LocalBackend(lm)
    records = run_jobs(plan.jobs, store, backend=local, task=ships_job, progress=progress,
                       desc=f"ships {'+'.join(plan.levels)} {mode} jobs")  # fmt: skip
    values, base = assemble_values(plan, records)
    heads = [(layer, head) for layer in range(lm.info.n_layers) for head in range(lm.info.n_heads)]
    common = {"mode": mode, "eps": eps, "model_name": lm.name, "model_fingerprint": lm.fingerprint,
              "prompts_hash": encoded.texts_hash, "n_prompts": len(encoded)}  # fmt: skip
    seconds = round(time.perf_counter() - started, 3)
    return level_scores(lm, values, plan.levels, heads, base, r_main, common, seconds)

