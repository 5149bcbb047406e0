"""Directional ablation folded into the weights: a plain HF folder with no refusal direction (Arditi et al.).

Projecting r̂ out of the residual stream everywhere (`fit.refusal_direction.directional_ablation`)
equals orthogonalising every matrix that writes to the stream, W ← (I − s·r̂r̂ᵀ)·W, when each block
adds its sublayers' outputs to the stream unscaled and un-normed: the token embedding (rows), each
attention output projection (o_proj, and its bias) and each MLP down projection (down_proj). The
stream then never gains a component along r̂, so the projections the hooks apply are no-ops.

- Tied embeddings (Qwen2.5-0.5B, Gemma): the unembedding reads the final norm's output, which is not
  orthogonal to r̂, so it must keep the original matrix: the export unties it (`lm_head` gets the
  original weights, `tie_word_embeddings` becomes false) and stock transformers loads both.
- Refused, with the reason: families that norm a sublayer's output before adding it (Gemma 2/3,
  OLMo 2: the norm puts r̂ back), scale the branch (Granite), route to experts (no single
  down_proj), or add position embeddings (GPT-2). Hooked directional ablation still works there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from finesteer.export.common import ExportError
from finesteer.export.hf_fold import EXPORT_FILE, fold_into, verify_hf
from finesteer.fit.refusal_direction import ablation_sites, directional_ablation
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.ops import ProjectOut
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

TARGET = "orthogonalised HF folder"


def ablated_direction(intervention: Intervention, n_layers: int) -> tuple[Tensor, float] | None:
    """(direction, strength) when `intervention` is exactly a directional ablation of one direction at
    every residual point (`directional_ablation`), else None."""
    edits = intervention.edits
    sites = ablation_sites(n_layers)
    if len(edits) != len(sites) or [e.site for e in edits] != sites:
        return None
    first = edits[0].op
    if not isinstance(first, ProjectOut):
        return None
    if any(e.op != first or str(e.scope) != "all" or e.rows is not None for e in edits):
        return None
    return first.direction, first.strength


def check_orthogonalizable(lm: LoadedModel) -> None:
    """Refuse families where folding into the writing matrices is not the hooked ablation (module doc)."""
    adapter, family = lm.adapter, lm.info.family
    block = adapter.block(lm.model, 0)
    post_norms = any(hasattr(block, n) for n in ("post_feedforward_layernorm", "post_mlp_layernorm"))
    reason = (
        "a norm follows each sublayer and puts the direction back"
        if post_norms or adapter.attn_branch != adapter.attention
        else "the experts have no single down projection"
        if adapter.mlp_down is None
        else "position embeddings also write to the residual stream"
        if adapter.conv1d
        else ""
    )
    if reason:
        raise ExportError(f"{TARGET}: cannot orthogonalise {family}: {reason}; use the hooked ablation")


def _untie(model: nn.Module) -> None:
    """Give the unembedding its own copy of the weights if it shares them with the embedding."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return
    out.weight = nn.Parameter(inp.weight.detach().clone())
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def orthogonalized_model(lm: LoadedModel, direction: Tensor, strength: float = 1.0) -> nn.Module:
    """A copy of `lm.model` with `direction` projected out of every matrix writing to the stream."""
    check_orthogonalizable(lm)
    model = copy.deepcopy(lm.model)
    _untie(model)
    op = ProjectOut(direction, strength)
    edits = [
        Edit(Site(layer, kind), op) for layer in range(lm.info.n_layers) for kind in ("attn_out", "mlp_out")
    ]
    fold_into(model, lm, edits)
    unit = direction.detach().double().cpu()
    unit = unit / unit.norm()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        weight = embed.detach().double()
        weight -= strength * torch.outer(weight @ unit.to(weight.device), unit.to(weight.device))
        embed.copy_(weight.to(embed.dtype))
    return model


def export_orthogonalized(
    lm: LoadedModel,
    direction: Tensor,
    out: str | Path,
    *,
    strength: float = 1.0,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write the orthogonalised model, its tokenizer and `finesteer_export.json` to an empty folder."""
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ExportError(f"{TARGET}: output folder {folder} exists and is not empty")
    model = orthogonalized_model(lm, direction, strength)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    info = {
        "format": "hf-orthogonalized",
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "strength": strength,
        "direction_norm": float(direction.norm()),
        **(record or {}),
    }
    (folder / EXPORT_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    return folder


def verify_orthogonalized(
    lm: LoadedModel,
    direction: Tensor,
    folder: str | Path,
    texts: Sequence[str],
    *,
    strength: float = 1.0,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Reload the folder with stock transformers; compare its logits with the hooked directional ablation."""
    return verify_hf(
        directional_ablation(direction, lm.info.n_layers, strength), lm, folder, texts, atol=atol
    )


__all__ = [
    "ablated_direction",
    "check_orthogonalizable",
    "export_orthogonalized",
    "orthogonalized_model",
    "verify_orthogonalized",
]
