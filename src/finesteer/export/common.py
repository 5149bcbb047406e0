"""What every export shares: its error, the static-edit check, and a steering's intervention."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from finesteer import __version__
from finesteer.errors import FinesteerError
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import Edit, Intervention
from finesteer.interventions.scope import Scope


class ExportError(FinesteerError, ValueError):
    """A steering that the chosen format cannot express (the message says why and what can)."""


def intervention_of(steering: Steering | Intervention, target: str) -> Intervention:
    """The intervention to export; a steering without one (a system prompt only) is refused."""
    if isinstance(steering, Intervention):
        return steering
    if steering.intervention is None:
        raise ExportError(f"{target}: steering '{steering.name}' has no intervention (only a system prompt)")
    return steering.intervention


def static_edits(intervention: Intervention, target: str) -> list[Edit]:
    """The non-identity edits, each checked to act on every token of every row (scope 'all').

    Exported formats add their vectors at every position; an edit limited to some positions (last,
    prompt, generated, from:N …) or to some batch rows has no static equivalent, so it is refused.
    """
    edits = [edit for edit in intervention.edits if not edit.op.is_identity()]
    if not edits:
        raise ExportError(f"{target}: the intervention is empty or an identity (α = 0): nothing to export")
    for edit in edits:
        if edit.rows is not None:
            raise ExportError(f"{target}: the edit at {edit.site} is limited to batch rows {list(edit.rows)}")
        if str(edit.scope) != "all":
            raise ExportError(
                f"{target}: the edit at {edit.site} acts on positions '{edit.scope}'; only static edits "
                "(scope 'all', every token) can be exported, as the exported form applies at every "
                "position. Export with --all-positions (`all_positions=True`) to take the all-token "
                "approximation"
            )
    return edits


def at_all_positions(steering: Steering | Intervention) -> tuple[Steering | Intervention, list[str]]:
    """The same steering with every edit's scope set to 'all' (an explicit, recorded approximation),
    and the list of scopes that were changed ('blocks.12.hook_resid_post: from_end:5 -> all')."""
    intervention = steering if isinstance(steering, Intervention) else steering.intervention
    if intervention is None:
        return steering, []
    changed = [f"{e.site}: {e.scope} -> all" for e in intervention.edits if str(e.scope) != "all"]
    rescoped = Intervention(tuple(replace(e, scope=Scope("all")) for e in intervention.edits))
    if isinstance(steering, Intervention):
        return rescoped, changed
    return replace(steering, intervention=rescoped), changed


def provenance(steering: Steering | Intervention, model_name: str, fingerprint: str) -> dict[str, Any]:
    """JSON-able record of what was exported, written beside (or into) every export."""
    record: dict[str, Any] = {
        "finesteer_version": __version__,
        "source_model": model_name,
        "source_fingerprint": fingerprint,
    }
    if isinstance(steering, Steering):
        record["steering"] = steering.name
        record["metadata"] = steering.metadata
    return record
