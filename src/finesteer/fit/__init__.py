"""Fit stage: turn located sites plus training data into a concrete intervention (directions, σ, α).

Every `fit_*` function returns a `FittedIntervention`, the one type the comparison harness and the
CLI consume, so methods (HSI, ITI, CAA, …) are interchangeable there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finesteer.interventions.edit import Intervention
    from finesteer.models.loading import LoadedModel


@dataclass
class FittedIntervention:
    """A fitted method: its name, the intervention to apply, and JSON-able provenance.

    `metadata` records what was chosen and why (heads, α, σ, validation rates, sweep summary) so a
    saved artifact can be audited without re-running the fit.
    """

    name: str
    intervention: Intervention
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path, lm: LoadedModel) -> Path:
        """Write a `finesteer.load_intervention`-compatible artifact (method name in metadata)."""
        from finesteer.artifacts import save_intervention

        return save_intervention(
            folder, self.intervention, lm, metadata={"method": self.name, **self.metadata}
        )


__all__ = ["FittedIntervention"]
