"""Save and load SAEs in SAELens' on-disk format, so SAEs move freely between finesteer and SAELens.

A folder holds `cfg.json` and `sae_weights.safetensors` (tensors W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in], and threshold [d_sae] for JumpReLU), written as SAELens 6 writes
them: top-level d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, architecture (+ k, rescale_acts_by_decoder_norm for topk), and a `metadata`
object with model_name, hook_name, sae_lens_version, … . `SAE.load_from_disk(folder)` reads it.

Loading also accepts pre-6.0 SAELens folders (hook_point, activation_fn_str, top-level model_name)
and, where the `sae_lens` package and the Hugging Face hub are reachable, a pretrained release +
SAE id from SAELens' registry (`load_sae("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")`),
converted to our module. finesteer works offline, so the usual path is a local folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from finesteer import __version__
from finesteer.sae.model import SAEConfig, SAEError, SparseAutoencoder

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: the SAELens cfg layout we follow (6.x, no pre-6 conversion)."""

_TOP_LEVEL_KEYS = frozenset(
    {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
     "reshape_activations", "architecture", "k", "rescale_acts_by_decoder_norm", "metadata"}
)  # fmt: skip


def sae_to_dict(cfg: SAEConfig) -> dict[str, Any]:
    """The `cfg.json` object SAELens 6 writes for this config."""
    data: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "architecture": cfg.architecture,
    }
    if cfg.architecture == "topk":
        data["k"] = cfg.k
        data["rescale_acts_by_decoder_norm"] = False
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": cfg.model_name or None,
        "hook_name": cfg.hook_name or None,
        "hook_head_index": None,
        "finesteer_version": __version__,
        **cfg.metadata,
    }
    if cfg.norm_scaling_factor is not None:
        metadata["norm_scaling_factor"] = cfg.norm_scaling_factor
    data["metadata"] = metadata
    return data


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors`; a norm scaling factor is folded in first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = sae.folded() if sae.cfg.normalize_activations != "none" else sae
    tensors = {name: p.detach().cpu().contiguous() for name, p in out.named_parameters()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise SAEError(f"refusing to save an SAE whose {name} contains NaN or inf")
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(sae_to_dict(out.cfg), indent=2, default=str) + "\n")
    return folder


def config_from_dict(data: dict[str, Any], folder: Path | None = None) -> SAEConfig:
    """Read a SAELens cfg.json object (6.x or pre-6 layout) into our config."""
    meta = dict(data.get("metadata") or {})
    hook_name = meta.get("hook_name") or data.get("hook_name") or data.get("hook_point") or ""
    model_name = meta.get("model_name") or data.get("model_name") or ""
    arch = data.get("architecture") or "standard"
    activation = data.get("activation_fn") or data.get("activation_fn_str")
    k = data.get("k")
    if activation == "topk" and k is None:
        k = (data.get("activation_fn_kwargs") or {}).get("k")
        arch = "topk"
    if data.get("rescale_acts_by_decoder_norm") and arch != "topk":
        raise SAEError(
            f"this {arch} SAE uses rescale_acts_by_decoder_norm=True, which finesteer implements for topk "
            "SAEs only; fold the decoder norms in SAELens (sae.fold_W_dec_norm()) and save it again"
        )
    if data.get("reshape_activations", "none") not in ("none", None):
        raise SAEError(f"reshape_activations={data['reshape_activations']!r} (hook_z SAEs) is not supported")
    if data.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise SAEError("per-head SAEs (hook_head_index set) are not supported; use a residual-stream SAE")
    norm = data.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    factor = data.get("norm_scaling_factor", meta.get("norm_scaling_factor"))
    if norm == "expected_average_only_in" and factor is None and folder is not None:
        scaler = folder / SCALER_FILE
        if scaler.exists():
            factor = json.loads(scaler.read_text()).get("scaling_factor")
    if norm == "expected_average_only_in" and factor is None:
        raise SAEError(
            "cfg says normalize_activations='expected_average_only_in' but no scaling factor is given "
            f"(cfg norm_scaling_factor or {SCALER_FILE}); fold it into the weights in SAELens first"
        )
    extra = {
        k_: v
        for k_, v in meta.items()
        if k_ not in {"model_name", "hook_name", "hook_head_index", "norm_scaling_factor"}
    }
    extra.update({k_: v for k_, v in data.items() if k_ not in _TOP_LEVEL_KEYS and k_ not in _PRE6_KEYS})
    return SAEConfig(
        d_in=int(data["d_in"]),
        d_sae=int(data["d_sae"]),
        architecture=arch,
        k=k,
        hook_name=hook_name,
        model_name=model_name,
        normalize_activations=norm,
        norm_scaling_factor=None if factor is None else float(factor),
        apply_b_dec_to_input=bool(data.get("apply_b_dec_to_input", True)),
        dtype=str(data.get("dtype", "float32")).removeprefix("torch."),
        metadata=extra,
    )


_PRE6_KEYS = frozenset(
    {"hook_name", "hook_point", "model_name", "activation_fn", "activation_fn_str", "activation_fn_kwargs",
     "hook_head_index", "hook_point_head_index", "norm_scaling_factor"}
)  # fmt: skip


def fold_decoder_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SAELens TopK SAE with `rescale_acts_by_decoder_norm` as the plain TopK SAE that computes the
    same thing: SAELens encodes (x·W_enc + b_enc)·‖W_dec,i‖ and decodes (f / ‖W_dec,i‖)·W_dec, so
    W_enc·n, b_enc·n and W_dec / n give the same latents and reconstruction exactly (unit-norm rows,
    the usual case, are left as they are: n = 1)."""
    norms = state["W_dec"].norm(dim=-1)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise SAEError("rescale_acts_by_decoder_norm: a decoder row has zero or non-finite norm")
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-6):
        return state
    folded = dict(state)
    folded["W_enc"] = state["W_enc"] * norms[None, :]
    folded["b_enc"] = state["b_enc"] * norms
    folded["W_dec"] = state["W_dec"] / norms[:, None]
    return folded


def load_sae_folder(folder: str | Path, *, dtype: str | None = None) -> SparseAutoencoder:
    """Load a SAELens-format folder (ours or SAELens'); `dtype` overrides the stored one."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE} (SAELens format)"
        )
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise SAEError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if dtype is not None:
        data["dtype"] = dtype
    try:
        cfg = config_from_dict(data, folder)
    except KeyError as exc:
        raise SAEError(f"{cfg_path} lacks the field {exc.args[0]!r}") from exc
    state = load_file(str(weights_path))
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").exp()
    if "scaling_factor" in state:  # old SAELens "finetuning scaling factor": all ones means unused
        scaling = state.pop("scaling_factor")
        if not torch.allclose(scaling, torch.ones_like(scaling)):
            raise SAEError("this SAE has a finetuning scaling_factor ≠ 1, which finesteer does not implement")
    if data.get("rescale_acts_by_decoder_norm"):
        state = fold_decoder_norms(state)
    return SparseAutoencoder.from_state(cfg, state)


def load_sae(source: str | Path, sae_id: str | None = None, *, dtype: str | None = None) -> SparseAutoencoder:
    """Load an SAE from a local SAELens-format folder, or (`sae_id` given) a SAELens pretrained release.

    The release path needs the `sae_lens` package and network access to the Hugging Face hub; the
    SAE is downloaded by SAELens and converted (weights are copied, not re-derived).
    """
    path = Path(source).expanduser()
    if sae_id is None:
        if not path.exists():
            raise FileNotFoundError(
                f"no SAE folder at {path}; pass a local SAELens folder (cfg.json + sae_weights.safetensors), "
                "or a SAELens release with sae_id= when sae_lens and the hub are available"
            )
        return load_sae_folder(path, dtype=dtype)
    try:
        from sae_lens import SAE  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SAEError(
            f"loading the pretrained release {source!r}/{sae_id!r} needs the sae_lens package "
            "(pip install sae-lens) and hub access; offline, pass a local SAELens folder instead"
        ) from exc
    sae = SAE.from_pretrained(str(source), sae_id, device="cpu", dtype=dtype or "float32")
    return from_saelens(sae)


def from_saelens(sae: Any) -> SparseAutoencoder:
    """Convert an in-memory `sae_lens.SAE` (any of our three architectures) to our module."""
    data = sae.cfg.to_dict()
    state = {name: tensor.detach().cpu() for name, tensor in sae.state_dict().items()}
    cfg = config_from_dict(data)
    if data.get("rescale_acts_by_decoder_norm"):
        state = fold_decoder_norms(state)
    return SparseAutoencoder.from_state(cfg, state)


__all__ = [
    "CFG_FILE",
    "WEIGHTS_FILE",
    "config_from_dict",
    "fold_decoder_norms",
    "from_saelens",
    "load_sae",
    "load_sae_folder",
    "sae_to_dict",
    "save_sae",
]
