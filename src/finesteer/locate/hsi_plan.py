"""The HSI sweep as a plan: one job per layer ((its heads × α) scores) plus the unsteered baseline.

`sweep_jobs` lists the jobs (ids `baseline`, `layer-<L>`); `sweep_job` is the task both backends run:
it scores one layer's heads, each steered alone with each α, on the A/B items with a prefix-cached
`ABScorer` built once per worker (its memo), exactly as `finesteer.locate.hsi.sweep_heads` scores a
layer in process. Records hold the tables as exact tensor fields, so a sweep assembled from them is
the same whichever backend, actor or resume made each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from finesteer.activations.directions import HeadDirections
from finesteer.data.items import ABItem
from finesteer.interventions.edit import Intervention
from finesteer.locate.hsi_table import SweepError
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Worker, record_tensor, tensor_record
from finesteer.runs.records import Record
from finesteer.runs.runner import Job
from finesteer.scoring.ab import ABPrompt, ABScorer

BASELINE_JOB = "baseline"


@dataclass(frozen=True)
class SweepJob:
    """One job's payload: a layer's heads (none for the baseline) and everything scoring them needs."""

    key: str
    layer: int | None
    heads: tuple[int, ...]
    alphas: tuple[float, ...]
    items: tuple[ABItem, ...]
    directions: HeadDirections
    prompt: ABPrompt
    batch_size: int
    max_rows: int


def layer_job_id(layer: int) -> str:
    return f"layer-{layer:03d}"


def sweep_jobs(
    key: str,
    grouped: dict[int, list[int]],
    alphas: Sequence[float],
    items: Sequence[ABItem],
    directions: HeadDirections,
    prompt: ABPrompt,
    batch_size: int,
    max_rows: int,
) -> list[Job]:
    """The baseline job, then one job per layer of `grouped` (layer → heads), in layer order."""
    common = (tuple(alphas), tuple(items), directions, prompt, batch_size, max_rows)
    jobs = [Job(BASELINE_JOB, payload=SweepJob(key, None, (), *common), check=_checker(key, BASELINE_JOB))]
    for layer in sorted(grouped):
        job_id = layer_job_id(layer)
        payload = SweepJob(key, layer, tuple(grouped[layer]), *common)
        jobs.append(Job(job_id, payload=payload, check=_checker(key, job_id)))
    return jobs


def _checker(key: str, job_id: str) -> Any:
    def check(saved: Record) -> None:
        if saved.get("config_key") != key:
            raise SweepError(
                f"stored job {job_id} was written by a sweep with another configuration (model, items, "
                "directions, α grid or prompt format); use a new run folder or delete it"
            )

    return check


def sweep_job(worker: Worker, job: SweepJob) -> dict[str, Any]:
    """One job on a worker holding the model: the baseline, or one layer's [heads, α, items] tables."""
    lm: LoadedModel = worker.state
    memo_key = f"hsi:{job.key}"
    if memo_key not in worker.memo:
        worker.memo[memo_key] = ABScorer(
            lm, list(job.items), job.prompt, batch_size=job.batch_size, max_rows=job.max_rows
        )
    scorer: ABScorer = worker.memo[memo_key]
    if job.layer is None:
        base = scorer.score([Intervention()], reuse_prefix=1)
        rate = float(base.matching.float().mean(dim=-1)[0])
        return {"config_key": job.key, "p_matching": tensor_record(base.p_matching[0].float()), "rate": rate}
    interventions = [job.directions.intervention([(job.layer, h)], a) for h in job.heads for a in job.alphas]
    scores = scorer.score(interventions, reuse_prefix=1)
    shape = (len(job.heads), len(job.alphas), len(scorer.targets))
    return {
        "config_key": job.key,
        "heads": list(job.heads),
        "per_item": tensor_record(scores.p_matching.float().view(shape)),
        "matching": tensor_record(scores.matching.view(shape).to(torch.uint8)),
    }


def layer_tables(record: Record) -> tuple[Tensor, Tensor]:
    """p(matching) [heads, α, items] and matching (bool) of a layer job's record."""
    return record_tensor(record["per_item"]), record_tensor(record["matching"]).bool()


def baseline_tables(record: Record) -> tuple[Tensor, float]:
    """The unsteered p(matching) per item and the matching rate of the baseline job's record."""
    return record_tensor(record["p_matching"]), float(record["rate"])
