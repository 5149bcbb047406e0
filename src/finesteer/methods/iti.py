"""ITI (Li et al. 2023): probe-ranked heads, mass-mean direction, head count and α chosen on val."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.iti import DEFAULT_ITI_ALPHAS, fit_iti_selection
from finesteer.fit.steering import Steering
from finesteer.locate.selection import Criterion
from finesteer.methods.base import MethodSettings
from finesteer.methods.caa import save_fitted
from finesteer.methods.data import BehaviourData, ContrastData, require_behaviour
from finesteer.methods.verdict import attach_verdict
from finesteer.report.probes import plot_probe_accuracy_folder

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class ITISettings(MethodSettings):
    """Keywords of `finesteer.fit.iti.fit_iti` (same defaults)."""

    method = "iti"
    k: int = 4
    alphas: Sequence[float] = DEFAULT_ITI_ALPHAS
    progress: bool = True
    system: str | None = None
    prefill: str = "("
    batch_size: int = 8
    max_rows: int = 128
    seed: int = 0
    search_k: bool = True
    balance_letters: bool = True
    balance_format: bool = False
    criterion: Criterion = "letter"
    control_seeds: Sequence[int] = CONTROL_SEEDS


class ITI:
    """ITI: probe-ranked heads, mass-mean direction (fits on train, selects on val)."""

    name: ClassVar[str] = "iti"
    description: ClassVar[str] = "ITI: probe-ranked heads, mass-mean direction"
    Settings: ClassVar[type[MethodSettings]] = ITISettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: ITISettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = ITISettings.parse(settings)
        behaviour = require_behaviour(self.name, data)
        # ITISettings' fields are fit_iti's keywords (tests/test_compare.py keeps them in step).
        fitted, selection = fit_iti_selection(
            lm, list(behaviour.train), list(behaviour.val), run_dir=run_dir, **s.to_dict()
        )
        attach_verdict(fitted.metadata, selection.evidence, "ITI selection")
        if run_dir is not None:
            plot_probe_accuracy_folder(run_dir)
        return save_fitted(fitted.bound(lm), run_dir)


__all__ = ["ITI", "ITISettings"]
