"""Per-head contrastive directions and strengths, the shared core of HSI and ITI.

For every head, v = mean(z | behaviour) − mean(z | not), unit-normalised (ITI's "center of mass"),
and σ = the std of *all* training activations (both classes) projected on v̂. A steering strength α
is then in units of σ: the edit adds θ = α·σ·v̂ to the head's o_proj-input slice, so one α means
"move this head by α typical spreads along its behaviour axis" whatever the head's scale.

z is read at the o_proj input (the per-head attention outputs before W_O), at the last token of
prompt + answer by default, for every layer in one capture pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
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
from finesteer.data.prompts import ab_completion, ab_prompt
from finesteer.errors import FinesteerError
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.ops import Add
from finesteer.interventions.scope import Scope
from finesteer.runs import write_safetensors_atomic
from finesteer.sites import Head, Site

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


LabelledCompletion = tuple[str, str, bool]
"""(formatted prompt, completion text, shows the behaviour?) — e.g. a sampled answer and its label."""


class DirectionError(FinesteerError, ValueError):
    """Directions that cannot be computed or applied (one class missing, NaN, zero direction)."""


@dataclass(frozen=True)
class HeadDirections:
    """Unit directions [n_layers, n_heads, head_dim] and spreads σ [n_layers, n_heads] for every head.

    A head whose two class means coincide has a zero direction and σ = 0; asking to steer it is an
    error rather than a silent no-op. `diagnostics` (when computed from activations) says per head how
    consistent the per-item differences are and how well the direction separates the two classes.
    """

    directions: Tensor
    sigma: Tensor
    n_pos: int
    n_neg: int
    diagnostics: DirectionDiagnostics | None = None

    def __post_init__(self) -> None:
        if self.directions.dim() != 3:
            raise DirectionError(
                f"directions must be [n_layers, n_heads, head_dim], got {tuple(self.directions.shape)}"
            )
        if tuple(self.sigma.shape) != tuple(self.directions.shape[:2]):
            raise DirectionError(
                f"sigma has shape {tuple(self.sigma.shape)}; expected {tuple(self.directions.shape[:2])}"
            )
        if not (torch.isfinite(self.directions).all() and torch.isfinite(self.sigma).all()):
            raise DirectionError("directions or sigma contain NaN/inf")

    @property
    def n_layers(self) -> int:
        return int(self.directions.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.directions.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.directions.shape[2])

    def check_head(self, layer: int, head: int) -> None:
        """Raise for a head outside the table or one with no direction (identical class means)."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise DirectionError(
                f"unknown head {layer}.{head}: directions cover {self.n_layers} layers × {self.n_heads} heads"
            )
        if float(self.directions[layer, head].norm()) == 0.0:
            raise DirectionError(f"head {layer}.{head} has no direction: its two class means are identical")

    def theta(self, layer: int, head: int, alpha: float) -> Tensor:
        """The vector α·σ·v̂ added to this head's output."""
        self.check_head(layer, head)
        return alpha * self.sigma[layer, head] * self.directions[layer, head]

    def intervention(
        self,
        heads: Iterable[Head],
        alpha: float | Mapping[Head, float],
        scope: str | Scope = "last",
    ) -> Intervention:
        """Add θ = α·σ·v̂ at each head's o_proj-input slice; α may be shared or given per head.

        Stored as Add(v̂, α·σ) so the artifact keeps the unit direction and `.scaled(f)` rescales α.
        Negative α steers away from the behaviour.
        """
        scope = Scope.parse(scope)
        edits = []
        for layer, head in heads:
            layer, head = int(layer), int(head)
            self.check_head(layer, head)
            if isinstance(alpha, Mapping):
                if (layer, head) not in alpha:
                    raise DirectionError(f"no α given for head {layer}.{head}")
                value = float(alpha[(layer, head)])
            else:
                value = float(alpha)
            scale = value * float(self.sigma[layer, head])
            edits.append(
                Edit(Site(layer, "z", head), Add(self.directions[layer, head].clone(), scale), scope)
            )
        if not edits:
            raise DirectionError("no heads given")
        return Intervention(tuple(edits))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"n_pos": str(self.n_pos), "n_neg": str(self.n_neg)}
        tensors = {"directions": self.directions, "sigma": self.sigma}
        if self.diagnostics is not None:
            tensors.update(self.diagnostics.tensors())
            meta["diagnostics_paired"] = str(int(self.diagnostics.paired))
        write_safetensors_atomic(path, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadDirections:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
        if "directions" not in tensors or "sigma" not in tensors:
            raise DirectionError(f"{path} is not a HeadDirections file (needs 'directions' and 'sigma')")
        diagnostics = DirectionDiagnostics.from_tensors(tensors, meta.get("diagnostics_paired", "1") == "1")
        return cls(
            tensors["directions"],
            tensors["sigma"],
            int(meta.get("n_pos", 0)),
            int(meta.get("n_neg", 0)),
            diagnostics,
        )

    def summary(self, heads: Iterable[Head]) -> list[dict[str, Any]]:
        """JSON-able per-head σ (for artifact metadata)."""
        return [
            {"layer": int(layer), "head": int(h), "sigma": float(self.sigma[layer, h])} for layer, h in heads
        ]


def directions_from_activations(
    z: Tensor, labels: Tensor | Sequence[bool], *, ddof: int = 0, remove: Tensor | None = None
) -> HeadDirections:
    """Mass-mean directions and σ from activations z [N, n_layers, n_heads, head_dim] and boolean labels.

    σ uses ddof=0 (population std, as HSI's `np.std`); ITI's current code uses the unbiased estimate
    (ddof=1). Computed in float64 so hand-checked values match to the last float32 digit. `remove`
    ([K, n_layers, n_heads, head_dim], e.g. `format_axes`) is projected out of the mean difference
    before it is normalised. Direction diagnostics are computed along the final directions.
    """
    labels = torch.as_tensor(labels, dtype=torch.bool)
    if z.dim() != 4:
        raise DirectionError(f"activations must be [N, n_layers, n_heads, head_dim], got {tuple(z.shape)}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise DirectionError(f"{z.shape[0]} activations but {tuple(labels.shape)} labels")
    if not torch.isfinite(z).all():
        raise DirectionError("activations contain NaN/inf")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise DirectionError(
            f"need activations of both classes; got {n_pos} behaviour-matching and {n_neg} not-matching"
        )
    if z.shape[0] <= ddof:
        raise DirectionError(f"σ with ddof={ddof} needs more than {ddof} activations")
    z64 = z.double()
    diff = z64[labels].mean(0) - z64[~labels].mean(0)
    if remove is not None and remove.shape[0] > 0:
        diff = project_out(diff, remove)
    norm = diff.norm(dim=-1, keepdim=True)
    unit = torch.where(
        norm > 0, diff / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(diff)
    )
    projections = torch.einsum("nlhd,lhd->nlh", z64, unit)
    sigma = projections.std(dim=0, correction=ddof)
    diagnostics = direction_diagnostics(z64, labels, remove) if min(n_pos, n_neg) >= 2 else None
    return HeadDirections(unit.float(), sigma.float(), n_pos, n_neg, diagnostics)


def ab_contrast_inputs(
    tokenizer: Any, items: Sequence[ABItem], *, system: str | None = None, prefill: str = "("
) -> tuple[list[tuple[str, str]], list[bool]]:
    """(prompt, answer) pairs for both answers of each A/B item, labelled True for the matching one.

    The answer is what `ab_completion` appends after the prompt (e.g. "A)"); passing it as a separate
    completion keeps tokenisation at the seam exact even where "(A" is one token.
    """
    if not items:
        raise DirectionError("no A/B items to build contrastive inputs from")
    inputs: list[tuple[str, str]] = []
    labels: list[bool] = []
    for item in items:
        prompt = ab_prompt(tokenizer, item, system=system, prefill=prefill)
        for letter, label in ((item.matching_letter, True), (item.not_matching_letter, False)):
            full = ab_completion(tokenizer, item, letter, system=system, prefill=prefill)
            inputs.append((prompt, full[len(prompt) :]))
            labels.append(label)
    return inputs, labels


def capture_heads(
    lm: LoadedModel,
    inputs: Sequence[str | tuple[str, str]],
    *,
    position: str | int = "last",
    batch_size: int = 8,
    progress: bool = False,
) -> Tensor:
    """z of every head of every layer: [N, n_layers, n_heads, head_dim], one capture pass."""
    sites = [Site(layer, "z") for layer in range(lm.info.n_layers)]
    acts = capture(lm, inputs, sites, position=position, batch_size=batch_size, progress=progress)
    return torch.stack([acts[site] for site in sites], dim=1)


def fit_head_directions(
    lm: LoadedModel,
    items: Sequence[ABItem] = (),
    *,
    completions: Sequence[LabelledCompletion] = (),
    system: str | None = None,
    prefill: str = "(",
    position: str | int = "last",
    ddof: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    balance_format: bool = False,
) -> HeadDirections:
    """Directions from A/B items (both answer letters) and/or labelled model completions.

    `completions` are (formatted prompt, completion, label) triples, e.g. sampled answers judged as
    showing the behaviour or not (HSI's original training data). `balance_format` projects the
    answer-letter and Yes/No axes (estimated on the A/B rows, `format_axes`) out of every direction.
    """
    inputs: list[tuple[str, str]] = []
    labels: list[bool] = []
    if items:
        inputs, labels = ab_contrast_inputs(lm.tokenizer, items, system=system, prefill=prefill)
    for i, triple in enumerate(completions):
        if len(triple) != 3:
            raise DirectionError(
                f"completion {i} must be (prompt, completion, label), got {len(triple)} fields"
            )
        prompt, completion, label = triple
        if not isinstance(label, bool | int):
            raise DirectionError(f"completion {i}: label must be a bool, got {type(label).__name__}")
        inputs.append((prompt, completion))
        labels.append(bool(label))
    if not inputs:
        raise DirectionError("no training data: give A/B items and/or labelled completions")
    z = capture_heads(lm, inputs, position=position, batch_size=batch_size, progress=progress)
    remove = None
    if balance_format and items:
        n_rows = 2 * len(items)
        letters, polarities = contrast_row_factors(items)
        remove = format_axes(z[:n_rows], labels[:n_rows], letters, polarities)
    return directions_from_activations(z, labels, ddof=ddof, remove=remove)


def directions_fingerprint(directions: HeadDirections) -> str:
    """A short content hash, so a resumed sweep refuses checkpoints made with other directions."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(directions.directions.contiguous().numpy().tobytes())
    digest.update(directions.sigma.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
