"""Train a TopK SAE on collected activations, with AuxK for dead latents, checkpoints and resume.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", as in SAELens' TopK trainer):
inputs scaled by s = √d_in / mean‖x‖ (folded into the weights on save); b_dec initialised to the
data mean; tied init W_enc = W_decᵀ with unit-norm decoder rows, renormalised after every Adam step;
loss = ‖x − x̂‖² / ‖x − x̄‖² (normalised MSE) + aux_coef · AuxK, where AuxK reconstructs the
residual x − x̂ with the top `aux_k` *dead* latents (no activation for `dead_after` tokens), which
pulls dead latents back into use. LR: linear warm-up, constant, linear decay over the last 20 %.

Decoding in training uses only the k active latents (`embedding_bag`), so a step costs one dense
encoder matmul plus k·d_in per token.

Resume is exact: each epoch's shuffle comes from a generator seeded by (seed, epoch), and the
checkpoint holds the weights, Adam state, step and dead-latent counters, so an interrupted run
continued with `resume=True` ends with the same weights as an uninterrupted one.

The checkpoint is one safetensors file (`checkpoint.safetensors`, replaced atomically): the tensors
(SAE parameters, Adam moments, dead-latent counters) plus the rest of the state as JSON in its
header. Nothing is unpickled, so a crafted checkpoint cannot run code; a pickle `checkpoint.pt` from
an older finesteer is refused with a message naming the format change.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.runs import write_safetensors_atomic
from finesteer.sae.metrics import SAEMetrics, evaluate_sae
from finesteer.sae.model import SAEConfig, SAEError, SparseAutoencoder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
#: The pickle checkpoint of finesteer ≤ 0.1.0: refused, never loaded (unpickling can run code).
LEGACY_CHECKPOINT = "checkpoint.pt"
_STATE_KEY = "finesteer_sae_checkpoint"
_CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; `epochs` passes over the collected activations."""

    d_sae: int = 4608
    k: int = 64
    epochs: float = 4.0
    batch_size: int = 1024
    lr: float = 5e-4
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_after: int = 50_000
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_sae < 1 or not 1 <= self.k <= self.d_sae:
            raise SAEError(f"need 1 ≤ k ≤ d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise SAEError("epochs, batch_size and lr must be positive")
        if not 0 <= self.decay_fraction <= 1:
            raise SAEError("decay_fraction must be in [0, 1]")


@dataclass
class TrainResult:
    """The trained SAE (normalisation not yet folded), per-interval training stats and timings."""

    sae: SparseAutoencoder
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    finished: bool = True


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def _sparse_decode(sae: SparseAutoencoder, values: Tensor, indices: Tensor) -> Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]] without materialising the dense latent vector."""
    return F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")


def train_step_loss(
    sae: SparseAutoencoder, x: Tensor, dead: Tensor, cfg: TrainConfig
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Loss for one batch of *scaled* inputs, its parts, and the indices of latents that fired."""
    pre = (
        (x - sae.b_dec) @ sae.W_enc + sae.b_enc if sae.cfg.apply_b_dec_to_input else x @ sae.W_enc + sae.b_enc
    )
    values, indices = pre.topk(cfg.k, dim=-1)
    values = torch.relu(values)
    recon = _sparse_decode(sae, values, indices) + sae.b_dec
    residual = x - recon
    variance = ((x - x.mean(0)) ** 2).sum(-1).mean().clamp(min=1e-12)
    nmse = (residual**2).sum(-1).mean() / variance
    loss = nmse
    aux_value = 0.0
    n_dead = int(dead.sum())
    if n_dead > 0 and cfg.aux_coef > 0:
        k_aux = min(cfg.aux_k, n_dead)
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        aux_values, aux_indices = aux_pre.topk(k_aux, dim=-1)
        aux_recon = _sparse_decode(sae, torch.relu(aux_values), aux_indices)
        target = residual.detach()
        aux = ((target - aux_recon) ** 2).sum(-1).mean() / (target**2).sum(-1).mean().clamp(min=1e-12)
        loss = loss + cfg.aux_coef * aux
        aux_value = float(aux.detach())
    fired = indices[values > 0].unique()
    return loss, {"nmse": float(nmse.detach()), "aux": aux_value}, fired


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a training checkpoint (current format or a refused legacy pickle)."""
    return (Path(run_dir) / CHECKPOINT).exists() or (Path(run_dir) / LEGACY_CHECKPOINT).exists()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_jsonable(v) for v in value["__tuple__"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def _save_checkpoint(
    path: Path, tensors: dict[str, Tensor], optimizer: dict[str, Any], state: dict[str, Any]
) -> None:
    """Write tensors + JSON state as one safetensors file, atomically (`runs.write_safetensors_atomic`)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    header = {
        "format": _CHECKPOINT_FORMAT,
        **state,
        "optimizer": {"param_groups": optimizer["param_groups"], "state_scalars": scalars},
    }
    write_safetensors_atomic(path, tensors, metadata={_STATE_KEY: json.dumps(_jsonable(header))})


def refuse_legacy_checkpoint(run_dir: str | Path) -> None:
    """Raise if `run_dir` holds only an old pickle checkpoint (call it before any heavy work)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists() and (run_dir / LEGACY_CHECKPOINT).exists():
        raise SAEError(
            f"{run_dir / LEGACY_CHECKPOINT} is a pickle checkpoint from an older finesteer; "
            f"checkpoints are now {CHECKPOINT} (safetensors + JSON) and pickles are never loaded, "
            "since unpickling can run code. Start a new run (or delete checkpoint.pt and train again)."
        )


def _load_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, optimizer state_dict, JSON state) of `run_dir`'s checkpoint; never unpickles."""
    refuse_legacy_checkpoint(run_dir)
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(_STATE_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if raw is None:
            raise ValueError("no finesteer state in its header")
        header = _from_jsonable(json.loads(raw))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEError(f"cannot resume: {path} is not a readable finesteer checkpoint ({exc})") from exc
    if header.get("format") != _CHECKPOINT_FORMAT:
        raise SAEError(f"cannot resume: {path} has checkpoint format {header.get('format')!r}")
    optim_header = header.pop("optimizer")
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    for index, values in optim_header["state_scalars"].items():
        optim_state.setdefault(int(index), {}).update(values)
    optimizer = {"state": optim_state, "param_groups": optim_header["param_groups"]}
    return tensors, optimizer, header


def _fresh_sae(acts: Tensor, cfg: TrainConfig, hook_name: str, model_name: str) -> SparseAutoencoder:
    """A new SAE scaled so inputs have mean norm √d_in, its decoder bias at the (scaled) data mean."""
    d_in = acts.shape[1]
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = acts[torch.randperm(len(acts), generator=generator)[: min(len(acts), 100_000)]]
    scale = math.sqrt(d_in) / float(sample.norm(dim=-1).mean())
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=cfg.d_sae,
        architecture="topk",
        k=cfg.k,
        hook_name=hook_name,
        model_name=model_name,
        normalize_activations="expected_average_only_in",
        norm_scaling_factor=scale,
    )
    sae = SparseAutoencoder(sae_cfg).initialize(generator)
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0) * scale)
    return sae


def _interval_record(
    window: list[dict[str, float]], since_fired: Tensor, step: int, total: int, cfg: TrainConfig
) -> dict[str, float]:
    """The history row of one checkpoint interval: mean losses, dead-latent share, learning rate."""
    return {
        "step": float(step),
        "nmse": sum(w["nmse"] for w in window) / len(window),
        "aux": sum(w["aux"] for w in window) / len(window),
        "dead_share": float((since_fired > cfg.dead_after).float().mean()),
        "lr": cfg.lr * _lr_factor(step - 1, total, cfg),
    }


def train_sae(
    acts: Tensor,
    cfg: TrainConfig,
    *,
    hook_name: str = "",
    model_name: str = "",
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    on_interval: Callable[[int, SparseAutoencoder], dict[str, float]] | None = None,
) -> TrainResult:
    """Train on activations [N, d_in]; checkpoints to `run_dir` every `cfg.checkpoint_every` steps.

    `resume=True` continues from `run_dir/checkpoint.safetensors` (same data and config required);
    `stop_after` ends this call after that many total steps (the run can be resumed later).
    `on_interval(step, sae)` may return extra numbers to log (e.g. held-out explained variance).
    """
    if acts.dim() != 2 or len(acts) < cfg.batch_size:
        raise SAEError(
            f"need at least one batch of activations [N ≥ {cfg.batch_size}, d_in], got {tuple(acts.shape)}"
        )
    if not torch.isfinite(acts).all():
        raise SAEError("training activations contain NaN or inf")
    acts = acts.float()
    d_in = acts.shape[1]
    steps_per_epoch = len(acts) // cfg.batch_size
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    ckpt_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    if resume and run_dir is None:
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} without a run_dir")

    if resume:
        tensors, optimizer_state, state = _load_checkpoint(Path(run_dir))  # type: ignore[arg-type]
        if state["train_config"] != asdict(cfg) or state["n_acts"] != len(acts) or state["d_in"] != d_in:
            raise SAEError(
                f"checkpoint in {run_dir} was made with another config or data "
                f"({state['train_config']}, {state['n_acts']} activations); start a new run"
            )
        sae_state = {k[len("sae.") :]: v for k, v in tensors.items() if k.startswith("sae.")}
        sae = SparseAutoencoder.from_state(SAEConfig(**state["sae_config"]), sae_state)
        step, since_fired = state["step"], tensors["since_fired"]
        history, elapsed = state["history"], state["train_seconds"]
    else:
        sae = _fresh_sae(acts, cfg, hook_name, model_name)
        step, since_fired, history, elapsed = 0, torch.zeros(cfg.d_sae, dtype=torch.long), [], 0.0
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    if resume:
        optimizer.load_state_dict(optimizer_state)
    scale = sae.cfg.scale
    end = total if stop_after is None else min(total, stop_after)
    bar = tqdm(total=total, initial=step, desc="train SAE", unit="step", disable=not progress)
    window: list[dict[str, float]] = []
    started = time.perf_counter()

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(
            ckpt_path,
            {**{f"sae.{k}": v for k, v in sae.state_dict().items()}, "since_fired": since_fired},
            optimizer.state_dict(),
            {
                "sae_config": {**sae.cfg.__dict__, "metadata": dict(sae.cfg.metadata)},
                "step": step,
                "history": history,
                "train_seconds": elapsed + time.perf_counter() - started,
                "train_config": asdict(cfg),
                "n_acts": len(acts),
                "d_in": d_in,
            },
        )

    while step < end:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for batch_index in range(offset, steps_per_epoch):
            if step >= end:
                break
            x = acts[perm[batch_index * cfg.batch_size : (batch_index + 1) * cfg.batch_size]] * scale
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total, cfg)
            loss, parts, fired = train_step_loss(sae, x, since_fired > cfg.dead_after, cfg)
            if not math.isfinite(float(loss.detach())):
                raise SAEError(
                    f"training diverged at step {step} (loss {float(loss.detach())}); lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_decoder()
            since_fired += cfg.batch_size
            since_fired[fired] = 0
            step += 1
            bar.update(1)
            window.append(parts)
            if step % cfg.checkpoint_every == 0 or step == end:
                record = _interval_record(window, since_fired, step, total, cfg)
                if on_interval is not None:
                    record.update(on_interval(step, sae))
                history.append(record)
                window = []
                bar.set_postfix(nmse=f"{record['nmse']:.3f}", dead=f"{record['dead_share']:.2f}")
                checkpoint()
    bar.close()
    seconds = elapsed + time.perf_counter() - started
    return TrainResult(sae, history, step, seconds, finished=step >= total)


def write_history(run_dir: str | Path, result: TrainResult, metrics: SAEMetrics | None = None) -> Path:
    """`training.json`: the loss curve, step count, time and final held-out metrics."""
    path = Path(run_dir) / "training.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "finished": result.finished,
        "history": result.history,
        "heldout": metrics.to_dict() if metrics else None,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


__all__ = [
    "CHECKPOINT",
    "LEGACY_CHECKPOINT",
    "TrainConfig",
    "TrainResult",
    "evaluate_sae",
    "has_checkpoint",
    "refuse_legacy_checkpoint",
    "train_sae",
    "train_step_loss",
    "write_history",
]
