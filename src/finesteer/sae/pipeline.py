"""Model → corpus → activation store → trained SAE folder, resumable at every stage.

A run folder holds `activations/` (the sharded store), `checkpoint.safetensors` (training state) and
`training.json`; the finished SAE is written in SAELens format to `out`. Rerunning with
`resume=True` reuses finished shards and continues training from the checkpoint; `manifest.json` in
the run folder records the model fingerprint, corpus, site and training settings, and a resume with
any other is refused (naming it) instead of training on another model's activations. The run folder
is locked while it is written.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finesteer.runs import MANIFEST_JSON, cache_root
from finesteer.runs.lock import LOCK_FILE, FolderLock
from finesteer.runs.manifest import RunManifest, check_manifest, content_hash
from finesteer.sae.corpus import CorpusSpec, heldout_texts, training_texts, with_generations
from finesteer.sae.io import save_sae
from finesteer.sae.metrics import SAEMetrics, evaluate_sae
from finesteer.sae.model import SAEError, SparseAutoencoder
from finesteer.sae.store import collect, common_prefix_length, load_split, site_activations
from finesteer.sae.train import (
    TrainConfig,
    has_checkpoint,
    refuse_legacy_checkpoint,
    train_sae,
    write_history,
)
from finesteer.sites import Site

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

log = logging.getLogger(__name__)


def default_sae_dir(model_name: str, layer: int, d_sae: int, k: int) -> Path:
    """`<cache>/saes/<model>/blocks.<L>.hook_resid_post/topk-<d_sae>-k<k>`."""
    return cache_root() / "saes" / model_name / f"blocks.{layer}.hook_resid_post" / f"topk-{d_sae}-k{k}"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class PipelineResult:
    sae: SparseAutoencoder
    out: Path
    heldout: SAEMetrics
    timings: dict[str, float]
    n_train_tokens: int
    n_texts: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "sae_dir": str(self.out),
            "hook_name": self.sae.cfg.hook_name,
            "d_sae": self.sae.cfg.d_sae,
            "k": self.sae.cfg.k,
            "heldout": self.heldout.to_dict(),
            "timings": self.timings,
            "n_train_tokens": self.n_train_tokens,
            "n_texts": self.n_texts,
        }


def _described(sae: SparseAutoencoder, corpus: CorpusSpec, training: dict[str, Any]) -> SparseAutoencoder:
    """`sae` with its provenance metadata: corpus, excluded positions, the training record."""
    sae.cfg = replace(
        sae.cfg,
        metadata={
            **sae.cfg.metadata,
            "prepend_bos": False,
            "context_size": None,
            "dataset_path": "finesteer corpus: " + json.dumps(asdict(corpus)),
            "exclude_positions": "first token of each text; shared template prefix kept once",
            "training": training,
        },
    )
    return sae


def train_on_model(
    lm: LoadedModel,
    layer: int,
    out: str | Path,
    *,
    tokens: int = 200_000,
    config: TrainConfig | None = None,
    corpus: CorpusSpec | None = None,
    generations: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> PipelineResult:
    """Train a TopK SAE on `blocks.<layer>.hook_resid_post` from ~`tokens` training tokens.

    Held-out metrics come from every 10th corpus text, never trained on. Wall and CPU seconds of
    collection and training are reported separately (the CPU may be shared).
    """
    config = config or TrainConfig()
    corpus = corpus or CorpusSpec()
    site = Site(layer, "resid_post")
    site.validate(lm.info)
    out = Path(out).expanduser()
    run = Path(run_dir) if run_dir is not None else out / "run"
    if not resume and has_checkpoint(run):
        raise SAEError(f"{run} already has a training checkpoint; pass resume=True or choose another folder")
    if resume:
        refuse_legacy_checkpoint(run)
    manifest = RunManifest(
        "sae train",
        model=lm.fingerprint,
        data=content_hash(asdict(corpus)),
        settings={
            "model": lm.name,
            "site": site.name,
            "tokens": tokens,
            "generations": generations,
            "train": asdict(config),
        },
    )
    with FolderLock(run):  # a second `sae train` on this run folder is refused at once
        started = run.is_dir() and any(p.name != LOCK_FILE for p in run.iterdir())
        check_manifest(run / MANIFEST_JSON, manifest, resuming=resume and started)
        return _collect_and_train(lm, site, out, run, tokens, config, corpus, generations, resume,
                                  batch_size, progress)  # fmt: skip


def _collect_and_train(
    lm: LoadedModel,
    site: Site,
    out: Path,
    run: Path,
    tokens: int,
    config: TrainConfig,
    corpus: CorpusSpec,
    generations: int,
    resume: bool,
    batch_size: int,
    progress: bool,
) -> PipelineResult:
    timings: dict[str, float] = {}
    wall, cpu = time.perf_counter(), _cpu_seconds()
    texts = [text for _, text in training_texts(lm.tokenizer, corpus)]
    if generations:
        texts = [t for _, t in with_generations(lm, training_texts(lm.tokenizer, corpus), generations)]
    store = collect(
        lm, texts, site, run / "activations", max_tokens=tokens, batch_size=batch_size, progress=progress
    )
    train = load_split(store, "train")
    heldout = load_split(store, "heldout")
    timings["collect_wall_s"] = round(time.perf_counter() - wall, 1)
    timings["collect_cpu_s"] = round(_cpu_seconds() - cpu, 1)
    log.info("collected %d train / %d held-out tokens at %s", len(train), len(heldout), site.name)

    wall, cpu = time.perf_counter(), _cpu_seconds()
    n_eval = min(len(heldout), 20_000)

    def heldout_ev(step: int, sae: SparseAutoencoder) -> dict[str, float]:
        m = evaluate_sae(sae, heldout[:n_eval])
        return {"heldout_ev": m.explained_variance, "heldout_l0": m.l0}

    result = train_sae(
        train,
        config,
        hook_name=site.name,
        model_name=lm.name,
        run_dir=run,
        resume=resume and has_checkpoint(run),
        progress=progress,
        on_interval=heldout_ev,
    )
    timings["train_wall_s"] = round(time.perf_counter() - wall, 1)
    timings["train_cpu_s"] = round(_cpu_seconds() - cpu, 1)
    metrics = evaluate_sae(result.sae, heldout)
    write_history(run, result, metrics)
    training = {
        "config": asdict(config),
        "n_train_tokens": len(train),
        "n_heldout_tokens": len(heldout),
        "heldout": metrics.to_dict(),
        "timings": timings,
    }
    final = _described(result.sae.folded(), corpus, training)
    save_sae(final, out)
    return PipelineResult(final, out, metrics, timings, len(train), len(texts))


def heldout_metrics(
    lm: LoadedModel, sae: SparseAutoencoder, *, n_per_source: int = 100, batch_size: int = 16
) -> SAEMetrics:
    """Metrics on fresh test-split texts (never in a training corpus) at the SAE's site."""
    site = sae.cfg.site
    site.validate(lm.info)
    if site.width(lm.info) != sae.cfg.d_in:
        raise SAEError(
            f"SAE reads d_in={sae.cfg.d_in} but {site} of {lm.name} has width {site.width(lm.info)}"
        )
    texts = [t for _, t in heldout_texts(lm.tokenizer, n_per_source)]
    token_lists = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = common_prefix_length(token_lists)
    starts = [min(len(t), max(1, shared if i else 0)) for i, t in enumerate(token_lists)]
    acts = site_activations(lm, token_lists, site, starts, batch_size=batch_size)
    return evaluate_sae(sae, torch.cat(acts))


__all__ = ["PipelineResult", "default_sae_dir", "heldout_metrics", "train_on_model"]
