"""CAA vectors: per layer, the mean residual difference between the matching and the other answer letter.

For each A/B item, the decoder-layer output (`resid_post`) at the answer-letter token of prompt + "(A"
(behaviour-matching answer) minus the same at prompt + "(B"; the vector of layer L is the mean of
these differences, not normalised. Saved and loaded as safetensors with the layers in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from finesteer.activations.capture import capture
from finesteer.activations.diagnostics import (
    DirectionDiagnostics,
    direction_diagnostics,
    format_axes,
    project_out,
)
from finesteer.data.balance import contrast_row_factors
from finesteer.data.items import ABItem
from finesteer.fit.caa_tail import CAAError
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt, item_target
from finesteer.sites import Site

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class CAAVectors:
    """Raw mean-difference vectors [len(layers), hidden], one per layer (not normalised), and the
    per-layer direction diagnostics when computed from activations (not saved)."""

    vectors: Tensor
    layers: tuple[int, ...]
    n_items: int
    diagnostics: DirectionDiagnostics | None = None

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.layers):
            raise CAAError(
                f"vectors must be [{len(self.layers)} layers, hidden], got {tuple(self.vectors.shape)}"
            )
        if not torch.isfinite(self.vectors).all():
            raise CAAError("CAA vectors contain NaN/inf (check the model's activations)")

    def vector(self, layer: int) -> Tensor:
        if layer not in self.layers:
            raise CAAError(f"no CAA vector for layer {layer}; fitted layers: {list(self.layers)}")
        return self.vectors[self.layers.index(layer)]

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in zip(self.layers, self.vectors, strict=True)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": json.dumps(list(self.layers)), "n_items": str(self.n_items)}
        save_file({"vectors": self.vectors.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CAAVectors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "layers" not in meta:
            raise CAAError(f"{path} is not a CAA vector file (no 'layers' metadata)")
        vectors = load_file(str(path))["vectors"]
        return cls(vectors, tuple(json.loads(meta["layers"])), int(meta.get("n_items", 0)))


def caa_contrast_inputs(
    tokenizer: Any, items: Sequence[ABItem], *, prompt: ABPrompt = DEFAULT_PROMPT
) -> list[str]:
    """Prompt + matching letter, then prompt + not-matching letter, for each item.

    The last token of each text is the answer-letter token the letter-probability metric scores
    ("A" after "(", or the merged "(A"); `item_target` checks that this holds for every item.
    """
    if not items:
        raise CAAError("no A/B items to compute CAA vectors from")
    inputs = []
    for item in items:
        item_target(tokenizer, item, prompt)
        text = prompt.text(tokenizer, item)
        inputs += [text + item.matching_letter, text + item.not_matching_letter]
    return inputs


def caa_vectors(
    lm: LoadedModel,
    items: Sequence[ABItem],
    *,
    layers: Sequence[int] | None = None,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    progress: bool = False,
    balance_format: bool = False,
) -> CAAVectors:
    """Mean over items of resid_post(letter of matching) − resid_post(letter of not matching), per layer.

    `balance_format` projects the answer-letter and Yes/No axes (`format_axes`, estimated within
    each class) out of every layer's vector; the vector keeps only what carries the behaviour."""
    chosen = tuple(range(lm.info.n_layers)) if layers is None else tuple(int(x) for x in layers)
    if not chosen:
        raise CAAError("no layers given")
    if len(set(chosen)) != len(chosen):
        raise CAAError(f"duplicate layers in {list(chosen)}")
    sites = [Site(layer, "resid_post") for layer in chosen]
    for site in sites:
        site.validate(lm.info)
    inputs = caa_contrast_inputs(lm.tokenizer, items, prompt=prompt)
    acts = capture(lm, inputs, sites, position="last", batch_size=batch_size, progress=progress)
    stacked = torch.stack([acts[site] for site in sites], dim=1).double()  # [2N, layers, hidden]
    diff = (stacked[0::2] - stacked[1::2]).mean(0)
    labels = [i % 2 == 0 for i in range(stacked.shape[0])]
    axes = None
    if balance_format:
        letters, polarities = contrast_row_factors(items)
        axes = format_axes(stacked, labels, letters, polarities)
        diff = project_out(diff, axes)
    diagnostics = direction_diagnostics(stacked, labels, axes) if len(items) >= 2 else None
    return CAAVectors(diff.float(), chosen, len(items), diagnostics)


__all__ = ["CAAVectors", "caa_contrast_inputs", "caa_vectors"]
