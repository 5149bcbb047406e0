"""HSI: steer the k heads most sensitive to their behaviour direction, with one shared α."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.fit.completions import LabelledCompletion
from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS, DirectionsFrom, fit_hsi
from finesteer.fit.steering import Steering
from finesteer.locate.hsi import RankBy
from finesteer.methods.base import MethodSettings
from finesteer.methods.caa import save_fitted
from finesteer.methods.data import BehaviourData, ContrastData, require_behaviour

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class HSISettings(MethodSettings):
    """Keywords of `finesteer.fit.hsi.fit_hsi` (same defaults)."""

    method = "hsi"
    k: int = 4
    alphas: Sequence[float] = DEFAULT_HSI_ALPHAS
    heads_subset: Sequence[Sequence[int]] | None = None
    progress: bool = True
    n_sweep: int = 24
    rank_by: RankBy = "balanced"
    search_k: bool = True
    system: str | None = None
    prefill: str = "("
    batch_size: int = 8
    max_rows: int = 128
    seed: int = 0
    balance_letters: bool = True
    directions_from: DirectionsFrom = "ab"
    completions: Sequence[LabelledCompletion] = ()
    n_samples: int = 2
    sample_temperature: float = 0.8
    final_check_tokens: int = 0


class HSI:
    """HSI: sweep-selected heads, shared α (fits on train, selects on val)."""

    name: ClassVar[str] = "hsi"
    description: ClassVar[str] = "HSI: sweep-selected heads, shared α"
    Settings: ClassVar[type[MethodSettings]] = HSISettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: HSISettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = HSISettings.parse(settings)
        behaviour = require_behaviour(self.name, data)
        fitted = fit_hsi(
            lm,
            list(behaviour.train),
            list(behaviour.val),
            k=s.k,
            alphas=s.alphas,
            heads_subset=s.heads_subset,  # type: ignore[arg-type]
            run_dir=run_dir,
            progress=s.progress,
            n_sweep=s.n_sweep,
            rank_by=s.rank_by,
            search_k=s.search_k,
            system=s.system,
            prefill=s.prefill,
            batch_size=s.batch_size,
            max_rows=s.max_rows,
            seed=s.seed,
            balance_letters=s.balance_letters,
            directions_from=s.directions_from,
            completions=s.completions,
            n_samples=s.n_samples,
            sample_temperature=s.sample_temperature,
            final_check_tokens=s.final_check_tokens,
        )
        return save_fitted(fitted.bound(lm), run_dir)


__all__ = ["HSI", "HSISettings"]
