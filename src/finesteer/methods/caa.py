"""CAA (Rimsky et al. 2024): residual vector at the answer letter, layer × multiplier chosen on val."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.fit.caa import DEFAULT_MULTIPLIERS, Direction, fit_caa_selection
from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.steering import Steering
from finesteer.methods.base import MethodSettings
from finesteer.methods.data import BehaviourData, ContrastData, require_behaviour
from finesteer.methods.verdict import attach_verdict
from finesteer.scoring.ab import ABPrompt

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class CAASettings(MethodSettings):
    """Keywords of `finesteer.fit.caa.fit_caa` (same defaults)."""

    method = "caa"
    layers: Sequence[int] | None = None
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS
    direction: Direction = "towards"
    tolerance: float = 0.1
    system: str | None = None
    prefill: str = "("
    batch_size: int = 8
    progress: bool = True
    balance_letters: bool = True
    balance_format: bool = False
    control_seeds: Sequence[int] = CONTROL_SEEDS


class CAA:
    """CAA residual vector; fits on the A/B train split, chooses layer × multiplier on val."""

    name: ClassVar[str] = "caa"
    description: ClassVar[str] = "CAA residual vector, layer × multiplier on val"
    Settings: ClassVar[type[MethodSettings]] = CAASettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: CAASettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = CAASettings.parse(settings)
        behaviour = require_behaviour(self.name, data)
        fitted, evidence = fit_caa_selection(
            lm,
            list(behaviour.train),
            list(behaviour.val),
            layers=s.layers,
            multipliers=s.multipliers,
            direction=s.direction,
            tolerance=s.tolerance,
            prompt=ABPrompt(s.system, s.prefill),
            batch_size=s.batch_size,
            run_dir=run_dir,
            progress=s.progress,
            balance_letters=s.balance_letters,
            balance_format=s.balance_format,
            control_seeds=s.control_seeds,
        )
        attach_verdict(fitted.metadata, evidence, "CAA selection")
        return save_fitted(fitted.bound(lm), run_dir)


def save_fitted(steering: Steering, run_dir: Path | None) -> Steering:
    """Save a fitted intervention as `<run_dir>/artifact` when given a folder; returns it unchanged."""
    if run_dir is not None:
        steering.save(run_dir / "artifact")
    return steering


__all__ = ["CAA", "CAASettings", "save_fitted"]
