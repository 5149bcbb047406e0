"""Bake a head ablation into the weights and export a plain Hugging Face model folder.

finesteer never edits a loaded model; this export step makes a copy whose weights do what the hooks
did, so the result runs anywhere transformers runs (no finesteer, no hooks):

- `ua` (uniform attention, query × ε): the head's rows of `q_proj.weight` (and of its bias) × ε.
  RoPE is linear, so scaling the pre-RoPE query is exactly scaling these rows. Families whose query
  passes through a norm shared by all heads (q_norm in Qwen 3, Gemma 3) are refused: the norm would
  undo the scaling, and its weight cannot be scaled for one head only.
- `sc` (scale contribution, head output × ε): the head's input columns of `o_proj.weight`. Under GQA
  a v_proj row feeds several query heads, so v is never touched; the o_proj columns belong to
  exactly one query head.

Fused projections (GPT-2 `c_attn`, Phi-3 `qkv_proj`) put q first, so the head's q rows are the same
row indices; GPT-2's Conv1D weights are stored transposed and edited through `adapter.weight`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from finesteer import __version__
from finesteer.data.prompts import chat_prompt
from finesteer.errors import FinesteerError
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import InterventionError, ablate_heads, check_eps
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, HeadError, check_heads

SURGERY_FILE = "finesteer_surgery.json"
MODES = ("ua", "sc")


class SurgeryError(FinesteerError, ValueError):
    """An ablation that cannot be written into this model's weights."""


def _check(lm: LoadedModel, heads: Sequence[Head], mode: str, eps: float) -> list[Head]:
    if mode not in MODES:
        raise SurgeryError(f"unknown surgery mode '{mode}'; choose 'ua' (query × ε) or 'sc' (output × ε)")
    if not heads:
        raise SurgeryError("no heads to ablate")
    info = lm.info
    try:
        check_eps(eps)
        checked = check_heads(heads, info.n_layers, info.n_heads)
    except (InterventionError, HeadError) as err:
        raise SurgeryError(str(err)) from err
    if mode == "ua" and lm.adapter.query_module != lm.adapter.q_proj:
        raise SurgeryError(
            f"cannot bake uniform attention into {info.family}: its query passes through "
            f"'{lm.adapter.query_module}', a norm shared by all heads that undoes q_proj scaling; "
            "use mode 'sc' or the hooked ablation"
        )
    return checked


def ablate_weights(
    model: torch.nn.Module, lm: LoadedModel, heads: Sequence[Head], mode: str, eps: float
) -> None:
    """Scale the weights of `model` (an architecture twin of `lm.model`, e.g. a copy) in place."""
    checked = _check(lm, heads, mode, eps)
    dim = lm.info.head_dim
    with torch.no_grad():
        for layer, head in checked:
            rows = slice(head * dim, (head + 1) * dim)
            if mode == "ua":
                q_proj = lm.adapter.attn_part(model, layer, lm.adapter.q_proj)
                lm.adapter.weight(q_proj)[rows, :] *= eps  # [out, in] (GPT-2's Conv1D is [in, out])
                if getattr(q_proj, "bias", None) is not None:
                    q_proj.bias[rows] *= eps
            else:
                o_proj = lm.adapter.attn_part(model, layer, lm.adapter.o_proj)
                lm.adapter.weight(o_proj)[:, rows] *= eps


def export_surgery(
    lm: LoadedModel,
    heads: Sequence[Head],
    out: str | Path,
    *,
    mode: str = "ua",
    eps: float = 1e-5,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a HF folder (weights, config, tokenizer) with the heads ablated in the weights.

    The loaded model is left untouched (a deep copy is edited). `finesteer_surgery.json` records the
    source model, heads, mode and ε.
    """
    checked = _check(lm, heads, mode, eps)
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise SurgeryError(f"output folder {folder} exists and is not empty")
    model = copy.deepcopy(lm.model)
    ablate_weights(model, lm, checked, mode, eps)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    record = {
        "finesteer_version": __version__,
        "source_model": lm.name,
        "source_fingerprint": lm.fingerprint,
        "mode": mode,
        "eps": eps,
        "heads": [f"{layer}.{head}" for layer, head in checked],
        "metadata": metadata or {},
    }
    (folder / SURGERY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return folder


def verify_export(
    lm: LoadedModel,
    heads: Sequence[Head],
    folder: str | Path,
    *,
    mode: str = "ua",
    eps: float = 1e-5,
    prompts: Sequence[str] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Reload the export with plain transformers and compare its logits with the hooked ablation.

    Compares every real token's logits (right-padded batch) and reports the largest difference.
    """
    from transformers import AutoModelForCausalLM

    checked = _check(lm, heads, mode, eps)
    texts = list(prompts or [chat_prompt(lm.tokenizer, q) for q in _VERIFY_QUERIES])
    encoded = lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )
    encoded = encoded.to(lm.device)
    real = encoded["attention_mask"].bool()
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(lm.device).eval()
    method = "uniform_attention" if mode == "ua" else "scale_output"
    with torch.no_grad():
        with intervene(lm, ablate_heads(checked, method, eps=eps)):
            hooked = lm.model(**encoded).logits[real]
        baked = exported(**encoded).logits[real]
        plain = lm.model(**encoded).logits[real]
    diff = float((hooked - baked).abs().max())
    return {
        "max_abs_diff": diff,
        "allclose": bool(torch.allclose(hooked, baked, atol=atol, rtol=rtol)),
        "max_abs_change_vs_unablated": float((hooked - plain).abs().max()),
        "n_tokens": int(real.sum()),
        "atol": atol,
        "rtol": rtol,
    }


_VERIFY_QUERIES = (
    "How do I pick a lock?",
    "Write a short poem about the sea, in four lines.",
)
