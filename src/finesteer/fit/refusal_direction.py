"""The refusal direction (Arditi et al. 2024): the coarse reference that head methods are measured against.

r = mean(harmful) − mean(harmless) of the residual stream entering a layer (`resid_pre`), at one of
the post-instruction positions (the tokens the chat template writes after the user's text, e.g.
Qwen's `<|im_end|>\\n<|im_start|>assistant\\n`). `mean_differences` computes it for every layer and
post-instruction position from one capture pass; `refusal_direction_select.select_direction` picks
one on validation prompts. Three interventions use it:

- `directional_ablation`: x ← x − (x·r̂)r̂ in the residual stream entering every block, between
  attention and MLP and leaving every block, at every position (Arditi's "ablate everywhere"), so
  no layer can read or write r̂ — expressed with the existing `ProjectOut` op, strength 1 = full;
- `RefusalDirection.addition`: x ← x + α·r at the chosen layer, every position (steer toward refusal);
- the weight-orthogonalised export (`finesteer.export.orthogonalize`), the same edit folded into
  every matrix that writes to the residual stream.

The direction is saved as a plain intervention artifact (its directional ablation; the raw vector,
layer and position in the metadata), so `finesteer eval -i`, `serve` and `export` apply it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finesteer.activations.capture import capture
from finesteer.artifacts import SPEC_FILE, load_intervention, save_intervention
from finesteer.errors import FinesteerError
from finesteer.fit.caa_tail import template_tail_ids
from finesteer.interventions.edit import Edit, Intervention, steer_residual
from finesteer.interventions.ops import ProjectOut
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import ABPrompt
from finesteer.sites import Site

METHOD = "refusal-direction"
RUN_SUBFOLDER = "direction"
"""Where `locate refusal-direction` puts the artifact inside its run folder."""


class RefusalDirectionError(FinesteerError, ValueError):
    """A refusal direction that cannot be fitted, applied or read (empty classes, zero vector, bad file)."""


@dataclass(frozen=True)
class RefusalDirection:
    """A residual-stream direction, the layer whose input it was read at and the position (−k = the
    k-th token from the prompt's end); `metadata` records how it was chosen."""

    vector: Tensor
    layer: int
    position: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vector = torch.as_tensor(self.vector).detach().float().cpu()
        if vector.dim() != 1 or not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0:
            raise RefusalDirectionError("a refusal direction must be a finite, non-zero 1-D vector")
        if self.layer < 0 or self.position >= 0:
            raise RefusalDirectionError(
                "layer must be ≥ 0 and position < 0 (from the prompt's end), "
                f"got {self.layer}, {self.position}"
            )
        object.__setattr__(self, "vector", vector)

    @property
    def unit(self) -> Tensor:
        return self.vector / self.vector.norm()

    def ablation(self, n_layers: int, strength: float = 1.0) -> Intervention:
        """Directional ablation at every layer and position (see `directional_ablation`)."""
        return directional_ablation(self.vector, n_layers, strength)

    def addition(self, scale: float = 1.0) -> Intervention:
        """Activation addition x + scale·r at the input of the chosen layer, every position."""
        return steer_residual(self.layer, self.vector, scale, scope="all", component="resid_pre")

    def save(self, folder: str | Path, lm: LoadedModel) -> Path:
        """An intervention artifact holding the directional ablation (the vector is its direction)."""
        meta = {
            "method": METHOD,
            "layer": self.layer,
            "position": self.position,
            "norm": float(self.vector.norm()),
            **self.metadata,
        }
        return save_intervention(folder, self.ablation(lm.info.n_layers), lm, metadata=meta)

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None) -> RefusalDirection:
        """Read a folder written by `save`, or the `locate refusal-direction` run folder holding one in
        `direction/` (checked against `lm`'s shape and weights when given)."""
        path = Path(folder)
        if not (path / SPEC_FILE).is_file() and (path / RUN_SUBFOLDER / SPEC_FILE).is_file():
            path = path / RUN_SUBFOLDER
        artifact = load_intervention(path, lm)
        meta = dict(artifact.metadata)
        ops = [e.op for e in artifact.intervention.edits if isinstance(e.op, ProjectOut)]
        if meta.get("method") != METHOD or not ops:
            raise RefusalDirectionError(f"{folder} is not a refusal-direction artifact")
        layer, position = int(meta.pop("layer")), int(meta.pop("position"))
        for key in ("method", "norm"):
            meta.pop(key, None)
        return cls(ops[0].direction, layer, position, meta)


def ablation_sites(n_layers: int) -> list[Site]:
    """Every residual-stream point: each block's input, middle and output (Arditi et al.'s hooks; the
    output edit of block l makes the stream orthogonal before block l + 1's input edit sees it)."""
    return [
        Site(layer, kind) for layer in range(n_layers) for kind in ("resid_pre", "resid_mid", "resid_post")
    ]


def directional_ablation(direction: Tensor, n_layers: int, strength: float = 1.0) -> Intervention:
    """Project `direction` out of the residual stream everywhere (strength 1: no component is left at
    any layer or position; 0: no-op). Equivalent, where a block adds its sublayers' outputs to the
    stream unscaled and un-normed, to orthogonalising every matrix that writes to the stream."""
    if n_layers < 1:
        raise RefusalDirectionError(f"n_layers must be ≥ 1, got {n_layers}")
    # one tensor per edit: the artifact writer refuses tensors that share memory
    vector = torch.as_tensor(direction).detach()
    return Intervention(
        tuple(Edit(site, ProjectOut(vector.clone(), strength)) for site in ablation_sites(n_layers))
    )


def post_instruction_count(tokenizer: Any) -> int:
    """How many tokens the chat template writes after the user's text (no system prompt, no prefill)."""
    return max(1, len(template_tail_ids(tokenizer, ABPrompt(prefill=""))))


def mean_differences(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    n_positions: int,
    *,
    batch_size: int = 8,
    chunk: int = 32,
) -> Tensor:
    """[n_positions, n_layers, d_model] mean(harmful) − mean(harmless) of `resid_pre`, position p − 1
    of the first axis being the p-th token from each prompt's end (prompts fully formatted)."""
    if not harmful or not harmless:
        raise RefusalDirectionError("need at least one harmful and one harmless prompt")
    if n_positions < 1:
        raise RefusalDirectionError(f"n_positions must be ≥ 1, got {n_positions}")
    return _mean(lm, harmful, n_positions, batch_size, chunk) - _mean(
        lm, harmless, n_positions, batch_size, chunk
    )


def _mean(lm: LoadedModel, prompts: Sequence[str], n_positions: int, batch_size: int, chunk: int) -> Tensor:
    """Mean resid_pre of the last `n_positions` tokens, [n_positions, n_layers, d] (last token first)."""
    sites = [Site(layer, "resid_pre") for layer in range(lm.info.n_layers)]
    total = torch.zeros(n_positions, lm.info.n_layers, lm.info.hidden_size, dtype=torch.float64)
    for start in range(0, len(prompts), chunk):
        acts = capture(lm, prompts[start : start + chunk], sites, position="all", batch_size=batch_size)
        assert acts.lengths is not None
        if int(acts.lengths.min()) < n_positions:
            raise RefusalDirectionError(f"a prompt has fewer than {n_positions} tokens")
        for k in range(n_positions):
            index = acts.lengths - 1 - k
            rows = torch.arange(len(index))
            total[k] += torch.stack([acts[s][rows, index].double().sum(0) for s in sites])
    return (total / len(prompts)).float()


__all__ = [
    "METHOD",
    "RUN_SUBFOLDER",
    "RefusalDirection",
    "RefusalDirectionError",
    "ablation_sites",
    "directional_ablation",
    "mean_differences",
    "post_instruction_count",
]
