"""HSI head selection: the binary-choice sensitivity sweep and top-k + shared-α choice.

For every head (or a subset), steer that head alone by α·σ·v̂ at the last position for each α of a
grid and measure the behaviour-matching A/B letter probabilities. The result is a layer × head × α
table (`HsiSweep`); its best-over-α gain is a `HeadScores` ranking. By default the gain is
letter-balanced (the worst matching-letter group's gain), so heads that merely shift the model's
A/B letter preference do not rank. `select_heads` then steers the top heads together and picks how
many (≤ k) and one shared α on a validation split.

Sweeps are exact but cheap: every edit acts on the last prompt token only, so each prompt's prefix
KV cache is computed once and many (head, α) rows share it (`ABScorer`, `reuse_prefix=1`). A run
folder gets one checkpoint per layer, and a rerun with the same configuration skips the finished
layers. The sweep table `HsiSweep` lives in `finesteer.locate.hsi_table`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.activations.directions import HeadDirections, directions_fingerprint
from finesteer.data.items import ABItem
from finesteer.interventions.edit import Intervention
from finesteer.locate.hsi_plan import (
    BASELINE_JOB,
    baseline_tables,
    layer_job_id,
    layer_tables,
    sweep_job,
    sweep_jobs,
)
from finesteer.locate.hsi_table import HsiSweep, RankBy, SweepError, check_alphas
from finesteer.locate.scores import hash_prompts
from finesteer.locate.selection import ControlBuilder, Selection, polarity_groups, select_prefix_and_alpha
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend
from finesteer.runs.lock import FolderLock
from finesteer.runs.records import JsonlRecords
from finesteer.runs.runner import run_jobs
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, ABScorer
from finesteer.sites import Head

SWEEP_DIR = "sweep"
SWEEP_FILE = "sweep.safetensors"
"""The sweep table `sweep_heads` writes to its run folder (`HsiSweep.save`)."""
BASELINE_FILE = "baseline.safetensors"


def _config_key(
    lm: LoadedModel, items: Sequence[ABItem], directions: HeadDirections, alphas: Sequence[float], fmt: str
) -> str:
    """What a checkpoint must match to be reused: model, items, directions, α grid, prompt format."""
    payload = json.dumps(
        {
            "model": [lm.name, lm.fingerprint],
            "items": hash_prompts(f"{i.id}\x00{i.question}\x00{i.matching}" for i in items),
            "directions": directions_fingerprint(directions),
            "alphas": list(alphas),
            "format": fmt,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _heads_by_layer(
    directions: HeadDirections, heads: Iterable[Head] | None, n_layers: int, n_heads: int
) -> dict[int, list[int]]:
    if (directions.n_layers, directions.n_heads) != (n_layers, n_heads):
        raise SweepError(
            f"directions cover {directions.n_layers}×{directions.n_heads} heads; the model has "
            f"{n_layers}×{n_heads}"
        )
    if heads is None:
        has_direction = directions.directions.norm(dim=-1) > 0
        chosen = [(int(layer), int(h)) for layer, h in has_direction.nonzero().tolist()]
    else:
        chosen = sorted({(int(layer), int(h)) for layer, h in heads})
        for layer, head in chosen:
            directions.check_head(layer, head)
    if not chosen:
        raise SweepError("no heads to sweep")
    grouped: dict[int, list[int]] = {}
    for layer, head in chosen:
        grouped.setdefault(layer, []).append(head)
    return grouped


def _read_checkpoint(path: Path, key: str) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("config_key") != key:
            raise SweepError(
                f"checkpoint {path} was written by a sweep with another configuration (model, items, "
                "directions, α grid or prompt format); use a new run folder or delete it"
            )
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _baseline(scorer: ABScorer, folder: Path | None, key: str) -> tuple[Tensor, float]:
    """The unsteered p(matching) per item and matching rate, read from or written to `folder`."""
    baseline_ckpt = _read_checkpoint(folder / BASELINE_FILE, key) if folder else None
    if baseline_ckpt is not None:
        return baseline_ckpt["p_matching"], float(baseline_ckpt["matching_rate"][0])
    base = scorer.score([Intervention()], reuse_prefix=1)
    # float32 tables, as the sweep has always stored them.
    baseline_p, baseline_rate = base.p_matching[0].float(), float(base.matching.float().mean(dim=-1)[0])
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"p_matching": baseline_p.contiguous(), "matching_rate": torch.tensor([baseline_rate])},
            str(folder / BASELINE_FILE),
            metadata={"config_key": key},
        )
    return baseline_p, baseline_rate


def _sweep_layer(
    scorer: ABScorer,
    directions: HeadDirections,
    layer: int,
    layer_heads: list[int],
    alphas: Sequence[float],
    path: Path | None,
    key: str,
) -> tuple[Tensor, Tensor]:
    """p(matching) and matching [heads, alphas, items] of one layer's heads steered alone
    (checkpointed to `path` when given)."""
    n_items = len(scorer.targets)
    interventions = [directions.intervention([(layer, h)], a) for h in layer_heads for a in alphas]
    scores = scorer.score(interventions, reuse_prefix=1)
    layer_p = scores.p_matching.float().view(len(layer_heads), len(alphas), n_items)
    layer_match = scores.matching.view(len(layer_heads), len(alphas), n_items)
    if path is not None:
        save_file(
            {
                "heads": torch.tensor(layer_heads),
                "per_item": layer_p.contiguous(),
                "matching": layer_match.to(torch.uint8).contiguous(),
            },
            str(path),
            metadata={"config_key": key},
        )
    return layer_p, layer_match


def sweep_heads(
    lm: LoadedModel,
    items: Sequence[ABItem],
    directions: HeadDirections,
    alphas: Sequence[float],
    *,
    heads: Iterable[Head] | None = None,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_rows: int = 128,
    run_dir: str | Path | None = None,
    progress: bool = True,
    backend: Backend | None = None,
) -> HsiSweep:
    """Steer each head alone with each α and score the A/B items; resumable per layer in `run_dir`.

    Writes only under `run_dir` (per-layer checkpoints and the sweep table), and only when given,
    holding its lock (a second process sweeping into it is refused at once). With `backend` the
    layers run as a plan on it (`finesteer.locate.hsi_plan`; records in `run_dir/sweep/jobs.jsonl`).
    """
    alphas = check_alphas(alphas)
    info = lm.info
    grouped = _heads_by_layer(directions, heads, info.n_layers, info.n_heads)
    # Prefix caches are built on the first score() call, so a fully resumed sweep runs no forward.
    scorer = ABScorer(lm, items, prompt, batch_size=batch_size, max_rows=max_rows)
    n_items = len(scorer.targets)
    key = _config_key(lm, items, directions, alphas, json.dumps([prompt.system, prompt.prefill]))
    folder = Path(run_dir) / SWEEP_DIR if run_dir is not None else None
    shape = (info.n_layers, info.n_heads, len(alphas))
    p_matching = torch.full(shape, float("nan"))
    rate = torch.full(shape, float("nan"))
    per_item = torch.full((*shape, n_items), float("nan"))

    with FolderLock(folder.parent) if folder is not None else nullcontext():  # one writer per run folder
        resumed: list[int] = []
        if backend is not None:
            jobs = sweep_jobs(key, grouped, alphas, items, directions, prompt, batch_size, max_rows)
            store = JsonlRecords(folder / "jobs.jsonl") if folder is not None else None

            def done(job_id: str, _record: object, stored: bool) -> None:
                if stored and job_id != BASELINE_JOB:
                    resumed.append(int(job_id.split("-")[1]))

            records = run_jobs(jobs, store, backend=backend, task=sweep_job, on_done=done, progress=progress,
                               desc="hsi sweep (jobs)", unit="job")  # fmt: skip
            baseline_p, baseline_rate = baseline_tables(records[BASELINE_JOB])
        else:
            baseline_p, baseline_rate = _baseline(scorer, folder, key)
        quiet = not progress or backend is not None
        for layer in tqdm(sorted(grouped), desc="hsi sweep (layers)", disable=quiet, unit="layer"):
            layer_heads = grouped[layer]
            path = folder / f"layer_{layer:03d}.safetensors" if folder else None
            ckpt = _read_checkpoint(path, key) if path and backend is None else None
            if backend is not None:
                layer_p, layer_match = layer_tables(records[layer_job_id(layer)])
            elif ckpt is not None and ckpt["heads"].tolist() == layer_heads:
                resumed.append(layer)
                layer_p = ckpt["per_item"]
                layer_match = ckpt["matching"].bool()
            else:
                layer_p, layer_match = _sweep_layer(scorer, directions, layer, layer_heads, alphas, path, key)
            index = torch.tensor(layer_heads)
            per_item[layer, index] = layer_p
            p_matching[layer, index] = layer_p.mean(-1)
            rate[layer, index] = layer_match.float().mean(-1)

        meta = {
            "config_key": key,
            "baseline_matching_rate": baseline_rate,
            "resumed_layers": resumed,
            "system": prompt.system,
            "prefill": prompt.prefill,
            "model_name": lm.name,
        }
        letters = [item.matching_letter for item in items]
        ids = [t.id for t in scorer.targets]
        groups = polarity_groups(items)
        sweep = HsiSweep(alphas, p_matching, rate, per_item, baseline_p, ids, letters, meta, groups)
        if folder is not None:
            sweep.save(folder.parent / SWEEP_FILE)
        return sweep


def select_heads(
    lm: LoadedModel,
    sweep: HsiSweep,
    val_items: Sequence[ABItem],
    directions: HeadDirections,
    *,
    k: int = 4,
    alphas: Sequence[float] | None = None,
    rank_by: RankBy = "balanced",
    search_k: bool = True,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_rows: int = 128,
    control: ControlBuilder | None = None,
    control_seeds: Sequence[int] = (0, 1, 2),
) -> Selection:
    """Steer the sweep's top heads together and choose how many (≤ k) and the shared α on `val_items`.

    `alphas` defaults to the sweep's grid; the criterion is the letter-balanced validation matching
    rate (`finesteer.locate.selection`), or the worst letter × polarity group's gain with
    `rank_by="polarity"`. Without `search_k` exactly k heads are used. `control` scores every
    candidate's matched control too (kept in the selection's evidence).
    """
    if k < 1:
        raise SweepError(f"k must be ≥ 1, got {k}")
    grid = check_alphas(alphas if alphas is not None else sweep.alphas)
    ranked = sweep.ranked_heads(rank_by)
    if len(ranked) < k:
        raise SweepError(f"asked for k={k} heads but only {len(ranked)} were swept")
    return select_prefix_and_alpha(
        lm,
        [(layer, head) for layer, head, _ in ranked[:k]],
        directions,
        val_items,
        grid,
        k=k,
        search_k=search_k,
        prompt=prompt,
        batch_size=batch_size,
        max_rows=max_rows,
        criterion="polarity" if rank_by == "polarity" else "letter",
        control=control,
        control_seeds=control_seeds,
    )
