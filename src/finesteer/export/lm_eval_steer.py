"""lm-evaluation-harness's `steered` model: a `.pt` steer file of vectors per hook point.

`lm_eval --model steered --model_args pretrained=MODEL,steer_path=FILE.pt` loads a dict
`{hookpoint: {"action": "add" | "clamp", "steering_vector": Tensor, "steering_coefficient": float,
"bias": None, "head_index": None}}` (lm_eval/models/hf_steered.py, 0.4.x). Each hookpoint is a module
name inside `model.base_model` (`layers.3`, `layers.3.self_attn.o_proj`, `norm`); lm-eval adds
coefficient × vector to that module's output at every position ("add"), or sets the output's component
along the vector to the coefficient ("clamp").

finesteer edits map exactly, at every position (scope 'all'):
- `Add` at resid_post L → `layers.L`; resid_pre L ≥ 1 → `layers.{L-1}`; attn_out → `layers.L.self_attn`;
  mlp_out → `layers.L.mlp`; ln_final → `norm`.
- `Add` to head h's output (hook_z) → `layers.L.self_attn.o_proj` with vector W_O[:, h] · v (o_proj is
  linear, so adding v to its input slice adds W_O[:, h] · v to its output); `Add` to head h's query
  (q_proj output, where no q_norm follows) → `layers.L.self_attn.q_proj` with v in the head's slice.
- `ProjectOut` with strength 1 at a full-width site → "clamp" to 0 (directional ablation).
Several adds at one hook point are summed. Anything else is refused.

Tested against lm-eval 0.4.13's `SteeredModel`. Older releases built each "add" hook as a lambda
over the loop's variables, so with several hook points every hook added the last one's vector: use a
current lm-eval when the file has more than one hook point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finesteer.export.common import ExportError, intervention_of, static_edits
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.ops import Add, ProjectOut
from finesteer.models.loading import LoadedModel
from finesteer.sites import Site

TARGET = "lm-eval steered"


def _relative(lm: LoadedModel, path: str) -> str:
    """A module path relative to the causal LM, as lm-eval names it (relative to `base_model`)."""
    prefix = f"{lm.adapter.base_model}."
    return path[len(prefix) :] if path.startswith(prefix) else path


def hookpoint(lm: LoadedModel, site: Site) -> str:
    """lm-eval's hookpoint whose output is (or, for heads, linearly carries) the site."""
    adapter = lm.adapter
    layers = _relative(lm, adapter.layers)
    block = f"{layers}.{site.layer}"
    if site.component == "resid_post":
        return block
    if site.component == "resid_pre":
        if site.layer == 0:
            raise ExportError(
                f"{TARGET}: {site} is the embeddings' output; lm-eval hooks module outputs and the "
                "embedding module's output is not the residual stream in every family: steer resid_post"
            )
        return f"{layers}.{site.layer - 1}"
    if site.component == "attn_out":
        return f"{block}.{adapter.attention}"
    if site.component == "mlp_out":
        return f"{block}.{adapter.mlp}"
    if site.component == "ln_final":
        return _relative(lm, adapter.final_norm)
    if site.component == "z":
        return f"{block}.{adapter.attention}.{adapter.o_proj}"
    if site.component == "q":
        if adapter.query_module != adapter.q_proj:
            raise ExportError(
                f"{TARGET}: {site}: in {lm.info.family} the query passes through '{adapter.query_module}' "
                "whose output is per-head 4-D; lm-eval cannot add to it"
            )
        return f"{block}.{adapter.attention}.{adapter.q_proj}"
    raise ExportError(f"{TARGET}: no lm-eval hookpoint for {site}")


def _full_vector(lm: LoadedModel, edit: Edit, vector: Tensor) -> Tensor:
    """The vector at the hook point's output for an add of `vector` at the edit's site."""
    site = edit.site
    if site.component == "z":
        dim = lm.info.head_dim
        o_proj = lm.adapter.attn_part(lm.model, site.layer, lm.adapter.o_proj)
        heads = range(lm.info.n_heads) if site.head is None else [site.head]
        weight = o_proj.weight.detach().to(torch.float64).cpu()
        out = torch.zeros(weight.shape[0], dtype=torch.float64)
        for head in heads:
            part = vector if site.head is not None else vector[head * dim : (head + 1) * dim]
            out += weight[:, head * dim : (head + 1) * dim] @ part.to(torch.float64)
        return out.to(torch.float32)
    if site.component == "q" and site.head is not None:
        dim = lm.info.head_dim
        out = torch.zeros(lm.info.n_heads * dim)
        out[site.head * dim : (site.head + 1) * dim] = vector
        return out
    return vector


def steer_config(steering: Steering | Intervention, lm: LoadedModel) -> dict[str, dict[str, Any]]:
    """The dict lm-eval's `steered` model loads from its `.pt` steer file."""
    intervention = intervention_of(steering, TARGET)
    intervention.validate(lm.info)
    config: dict[str, dict[str, Any]] = {}
    for edit in static_edits(intervention, TARGET):
        point = hookpoint(lm, edit.site)
        op = edit.op
        if isinstance(op, Add):
            vector = _full_vector(lm, edit, op.vector.detach().to(torch.float32).cpu())
            entry = {"action": "add", "steering_vector": vector, "steering_coefficient": op.scale}
        elif isinstance(op, ProjectOut) and op.strength == 1.0 and edit.site.component not in ("z", "q"):
            direction = op.direction.detach().to(torch.float32).cpu()
            entry = {"action": "clamp", "steering_vector": direction, "steering_coefficient": 0.0}
        else:
            raise ExportError(
                f"{TARGET}: the edit at {edit.site} is '{op.kind}'"
                + (f" (strength {op.strength})" if isinstance(op, ProjectOut) else "")
                + "; lm-eval can add a vector anywhere, or clamp (project out fully) a full-width site"
            )
        previous = config.get(point)
        if previous is not None:
            if previous["action"] != "add" or entry["action"] != "add":
                raise ExportError(f"{TARGET}: two edits at {point} that are not both adds cannot be combined")
            summed = (
                previous["steering_coefficient"] * previous["steering_vector"]
                + entry["steering_coefficient"] * entry["steering_vector"]
            )
            entry = {"action": "add", "steering_vector": summed, "steering_coefficient": 1.0}
        config[point] = {**entry, "bias": None, "head_index": None}
    return config


def write_steer_file(steering: Steering | Intervention, lm: LoadedModel, path: str | Path) -> Path:
    """Write the `.pt` steer file (loadable with `torch.load(..., weights_only=True)`)."""
    out = Path(path)
    if out.suffix not in (".pt", ".pth"):
        raise ExportError(f"{TARGET}: lm-eval reads steer files ending in .pt or .pth, got {out.name}")
    config = steer_config(steering, lm)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(config, out)
    return out
