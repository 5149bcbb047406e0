"""A plain Hugging Face folder with a static edit folded into the weights (no hooks, no finesteer).

Every op is affine on the slice it edits (x ↦ A·x + c: Add is A = I, c = s·v; Scale is A = f·I; Zero
A = 0; SetTo A = 0, c = m; ProjectOut A = I − s·d̂d̂ᵀ), and it edits the input or output of a linear
layer, so it folds exactly into that layer's weight W and bias b:

- a head's output (hook_z, o_proj's input slice h):   W[:, h] ← W[:, h]·A,  b ← b + W[:, h]·c
- a head's query (hook_q, q_proj's output rows h):     W[h] ← A·W[h],       b[h] ← A·b[h] + c
  (not where a q_norm shared by the heads follows q_proj: Qwen 3, Gemma 3)
- attn_out (o_proj's output) / mlp_out (down_proj's): W ← A·W,             b ← A·b + c
- resid_post L (= resid_pre L + 1), Add only: b(down_proj of L) += c, when nothing follows the MLP
  in the block (Gemma 2/3 and OLMo 2 normalise the MLP output: refused), ÷ `residual_multiplier`
  (Granite).

A bias (c ≠ 0) needs the linear layer to have one. Stock transformers adds it through a config flag:
`attention_bias` gives q/k/v/o_proj biases in Llama, Qwen 3, Gemma 1–3, OLMo 2 and Granite;
`mlp_bias` gives gate/up/down_proj biases in Llama and Granite. Mistral and Qwen 2 have no flag for
o_proj or down_proj: bias folds are refused there (weight-only folds — Scale, Zero, ProjectOut on heads
and sublayer outputs — still work). The flag's other new biases are zeros, so the model is unchanged
apart from the edit, and the folder loads with `AutoModelForCausalLM.from_pretrained` alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from finesteer.export.common import ExportError, intervention_of, provenance, static_edits
from finesteer.fit.steering import Steering
from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.ops import Add, Op, ProjectOut, Scale, SetTo, Zero
from finesteer.models.loading import LoadedModel

TARGET = "HF folder"
EXPORT_FILE = "finesteer_export.json"
BIAS_FLAGS = {"o_proj": "attention_bias", "down_proj": "mlp_bias"}


def affine(op: Op, width: int) -> tuple[Tensor, Tensor]:
    """(A, c) in float64 with op(x) = A·x + c on a slice of `width` values."""
    eye = torch.eye(width, dtype=torch.float64)
    zero = torch.zeros(width, dtype=torch.float64)
    if isinstance(op, Add):
        return eye, op.scale * op.vector.detach().to(torch.float64).cpu()
    if isinstance(op, Scale):
        return op.factor * eye, zero
    if isinstance(op, Zero):
        return 0 * eye, zero
    if isinstance(op, SetTo):
        return 0 * eye, op.vector.detach().to(torch.float64).cpu()
    if isinstance(op, ProjectOut):
        unit = op.direction.detach().to(torch.float64).cpu()
        unit = unit / unit.norm()
        return eye - op.strength * torch.outer(unit, unit), zero
    raise ExportError(f"{TARGET}: op '{op.kind}' cannot be folded into weights")


def _target(lm: LoadedModel, model: nn.Module, edit: Edit) -> tuple[str, nn.Linear, str]:
    """(linear name, the linear module in `model`, how the site meets it: input / output / resid)."""
    site, adapter = edit.site, lm.adapter
    if site.component == "z":
        return adapter.o_proj, adapter.attn_part(model, site.layer, adapter.o_proj), "input"
    if site.component == "q":
        if adapter.query_module != adapter.q_proj:
            raise ExportError(
                f"{TARGET}: cannot fold {site} into {lm.info.family}: its query passes through "
                f"'{adapter.query_module}', a norm shared by all heads that would undo the edit"
            )
        return adapter.q_proj, adapter.attn_part(model, site.layer, adapter.q_proj), "output"
    if site.component == "attn_out":
        return adapter.o_proj, adapter.attn_part(model, site.layer, adapter.o_proj), "output"
    layer = site.layer if site.component in ("mlp_out", "resid_post") else site.layer - 1
    if site.component not in ("mlp_out", "resid_post", "resid_pre") or layer < 0:
        raise ExportError(
            f"{TARGET}: {site} cannot be folded into a bias (only head outputs/queries, attn_out, "
            "mlp_out and the residual stream after a block can)"
        )
    block = adapter.block(model, layer)
    down = adapter.get(block, f"{adapter.mlp}.down_proj")
    if site.component == "mlp_out":
        return "down_proj", down, "output"
    if not isinstance(edit.op, Add):
        raise ExportError(
            f"{TARGET}: only an Add can be folded at {site} (the residual stream), not '{edit.op.kind}'"
        )
    if any(hasattr(block, name) for name in ("post_feedforward_layernorm", "post_mlp_layernorm")):
        raise ExportError(
            f"{TARGET}: cannot fold {site} in {lm.info.family}: a norm follows the MLP in each block, so "
            "no bias adds to the residual stream; steer attn_out/mlp_out or a head instead"
        )
    return "down_proj", down, "resid"


def _needs_bias(lm: LoadedModel, model: nn.Module, edits: Sequence[Edit]) -> set[str]:
    """Names of the linear layers that need a bias they lack."""
    needed = set()
    for edit in edits:
        name, linear, _ = _target(lm, model, edit)
        _, c = affine(edit.op, edit.site.width(lm.info) if edit.site.head is None else lm.info.head_dim)
        if bool(c.abs().max() > 0) and linear.bias is None:
            needed.add(name)
    return needed


def _with_biases(lm: LoadedModel, names: set[str]) -> nn.Module:
    """A copy of the model whose config flags give `names` (and their siblings) zero biases."""
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(lm.model)
    config = model.config
    for name in sorted(names):
        flag = BIAS_FLAGS.get(name)
        if flag is None or not hasattr(config, flag):
            raise ExportError(
                f"{TARGET}: {lm.info.family}'s {name} has no bias and transformers offers no config flag "
                f"to add one, so this edit cannot be folded (bias folds work for llama, qwen3, gemma, "
                "gemma2, gemma3, olmo2, granite on o_proj; llama, granite on down_proj)"
            )
        setattr(config, flag, True)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    have = dict(model.named_parameters())
    for key, param in reference.named_parameters():
        if key in have:
            continue
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf != "bias" or not isinstance(module, nn.Linear):
            raise ExportError(f"{TARGET}: enabling {sorted(names)} biases also adds '{key}'; cannot fold")
        module.bias = nn.Parameter(torch.zeros(param.shape, dtype=lm.dtype, device=module.weight.device))
    for name in names:
        for module_name, module in model.named_modules():
            if module_name.endswith(name) and isinstance(module, nn.Linear) and module.bias is None:
                raise ExportError(
                    f"{TARGET}: {lm.info.family} ignores '{BIAS_FLAGS[name]}' for {name}: cannot fold"
                )
    return model


def fold_into(model: nn.Module, lm: LoadedModel, edits: Sequence[Edit]) -> None:
    """Fold the edits, in order, into the weights of `model` (a copy of `lm.model` with the biases)."""
    dim = lm.info.head_dim
    with torch.no_grad():
        for edit in edits:
            _, linear, how = _target(lm, model, edit)
            weight = linear.weight.detach().to(torch.float64)
            bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
            head = edit.site.head
            width = dim if head is not None else edit.site.width(lm.info)
            a, c = (t.to(weight.device) for t in affine(edit.op, width))
            rows = slice(head * dim, (head + 1) * dim) if head is not None else slice(None)
            if how == "input":
                if bias is not None:
                    bias = bias + weight[:, rows] @ c
                weight[:, rows] = weight[:, rows] @ a
            elif how == "output":
                weight[rows] = a @ weight[rows]
                if bias is not None:
                    bias[rows] = a @ bias[rows] + c
            else:  # resid: an Add after the block, through down_proj's bias
                multiplier = float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)
                bias = bias + c / multiplier
            if bias is None and bool(c.abs().max() > 0):
                raise ExportError(f"{TARGET}: {edit.site} needs a bias that the model lacks")
            linear.weight.copy_(weight.to(linear.weight.dtype))
            if bias is not None:
                linear.bias.copy_(bias.to(linear.bias.dtype))


def folded_model(steering: Steering | Intervention, lm: LoadedModel) -> nn.Module:
    """A copy of `lm.model` with the steering folded into its weights (the loaded model is untouched)."""
    intervention = intervention_of(steering, TARGET)
    intervention.validate(lm.info)
    edits = static_edits(intervention, TARGET)
    names = _needs_bias(lm, lm.model, edits)
    model = _with_biases(lm, names) if names else copy.deepcopy(lm.model)
    fold_into(model, lm, edits)
    return model


def export_hf(steering: Steering | Intervention, lm: LoadedModel, out: str | Path) -> Path:
    """Write weights, config and tokenizer with the edit folded in, plus `finesteer_export.json`."""
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ExportError(f"{TARGET}: output folder {folder} exists and is not empty")
    model = folded_model(steering, lm)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    intervention = intervention_of(steering, TARGET)
    record = {
        **provenance(steering, lm.name, lm.fingerprint),
        "format": "hf-folded",
        "edits": [f"{edit.op.kind} at {edit.site}" for edit in static_edits(intervention, TARGET)],
        "intervention_digest": intervention.digest(),
    }
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return folder


def verify_hf(
    steering: Steering | Intervention,
    lm: LoadedModel,
    folder: str | Path,
    texts: Sequence[str],
    *,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Reload the folder with stock transformers and compare its logits with the hooked model's."""
    from transformers import AutoModelForCausalLM

    intervention = intervention_of(steering, TARGET)
    encoded = lm.tokenizer(
        list(texts), return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    ).to(lm.device)
    real = encoded["attention_mask"].bool()
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=lm.dtype).to(lm.device).eval()
    with torch.no_grad():
        with intervene(lm, intervention):
            hooked = lm.model(**encoded).logits[real].float()
        folded = exported(**encoded).logits[real].float()
        plain = lm.model(**encoded).logits[real].float()
    diff = float((hooked - folded).abs().max())
    return {
        "max_abs_diff": diff,
        "within_atol": diff <= atol,
        "atol": atol,
        "max_abs_change_vs_unsteered": float((hooked - plain).abs().max()),
        "n_tokens": int(real.sum()),
    }
