"""Apply an `Intervention` to a model for the duration of a `with` block.

All edits at one module are applied by a single hook in the order given; heads are sliced with the
model's real head_dim. Identity edits (scale 0, factor 1) are skipped entirely so α = 0 is
bit-for-bit the unmodified model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from finesteer.hooks import CallContext, HookSet, SiteCallback
from finesteer.interventions.edit import Edit, Intervention, InterventionError
from finesteer.models.info import ModelInfo
from finesteer.models.loading import unpack_model
from finesteer.sites import Site


def _row_mask(edit: Edit, ctx: CallContext) -> Tensor | None:
    if edit.rows is None:
        return None
    if max(edit.rows) >= ctx.batch_size:
        raise InterventionError(
            f"edit at {edit.site} targets batch row {max(edit.rows)} but the batch has {ctx.batch_size} rows"
        )
    mask = torch.zeros(ctx.batch_size, dtype=torch.bool, device=ctx.real.device)
    mask[list(edit.rows)] = True
    return mask


def _callback(edits: list[Edit], info: ModelInfo) -> SiteCallback:
    def apply_edits(act: Tensor, ctx: CallContext) -> Tensor:
        out = act.clone()
        batch, seq = out.shape[0], out.shape[1]
        for edit in edits:
            positions = edit.scope.mask(ctx)
            rows = _row_mask(edit, ctx)
            if rows is not None:
                positions = positions & rows[:, None]
            positions = positions.to(out.device)  # a layer on another GPU than the embeddings (device_map)
            if edit.site.head is not None:
                heads = edit.site.head_count(info)
                target = out.view(batch, seq, heads, info.head_dim)[:, :, edit.site.head, :]
            else:
                target = out
            target.copy_(torch.where(positions[..., None], edit.op(target), target))
        return out

    return apply_edits


def _hook_key(site: Site) -> Site:
    """Edits on different heads of one layer component share a hook."""
    return Site(site.layer, site.component)


def resolve(target: Any, intervention: Any) -> Intervention:
    """`intervention` itself, or for a loaded artifact (anything with `intervention_for`) its
    intervention after the artifact checked it was made for `target`'s weights (another model's
    artifact is refused unless `artifact.intervention_for(model, allow_other_weights=True)` is used)."""
    if isinstance(intervention, Intervention):
        return intervention
    for_model = getattr(intervention, "intervention_for", None)
    if for_model is None:
        raise InterventionError(
            f"expected an Intervention or a loaded artifact, got {type(intervention).__name__}"
        )
    return for_model(target)


@contextmanager
def intervene(target: Any, intervention: Intervention) -> Iterator[HookSet]:
    """Apply `intervention` to `target` (a LoadedModel or HF causal LM) inside the block.

    Validates every edit against the model first (layer/head range, vector size) so nothing is
    registered for a bad spec, and removes all hooks on exit, including after an exception, and also
    when the block is abandoned inside a garbage reference cycle (see `finesteer.hooks`). A loaded
    artifact may be passed instead of its intervention: it is then refused for other weights
    (`resolve`).

    While the block is open every forward of the model is edited, whoever calls it: a generator must
    not yield inside the block (`generate_batches` enters it around each batch instead).
    """
    model, adapter, info = unpack_model(target)
    intervention = resolve(target, intervention)
    intervention.validate(info)
    grouped: dict[Site, list[Edit]] = defaultdict(list)
    for edit in intervention.edits:
        if not edit.op.is_identity():
            grouped[_hook_key(edit.site)].append(edit)
    hooks = HookSet(model, adapter, info)
    try:
        for site, edits in grouped.items():
            hooks.add(site, _callback(edits, info))
        yield hooks
    finally:
        hooks.remove()
