"""HSI: steer the k heads most sensitive to their behaviour direction, with one shared α."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.evaluate.ab import generation_check
from finesteer.fit.completions import LabelledCompletion
from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.hsi import DEFAULT_HSI_ALPHAS, HSIConfig, HSIConfigError, fit_hsi_selection
from finesteer.fit.hsi_directions import DirectionsFrom
from finesteer.fit.steering import Steering
from finesteer.locate.hsi_table import RankBy
from finesteer.methods.base import MethodSettings
from finesteer.methods.caa import save_fitted
from finesteer.methods.data import BehaviourData, ContrastData, require_behaviour
from finesteer.methods.verdict import attach_verdict
from finesteer.report.sweep import plot_sweep_folder
from finesteer.runs import write_json_atomic

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class HSISettings(MethodSettings):
    """The fields of `finesteer.fit.hsi.HSIConfig` (same defaults; `system` / `prefill` for its prompt),
    plus `fit_hsi`'s completions and progress."""

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
    balance_format: bool = False
    control_seeds: Sequence[int] = CONTROL_SEEDS
    final_check_tokens: int = 0

    def config_fields(self) -> dict[str, object]:
        """The fields `HSIConfig.from_settings` takes (everything but progress and completions)."""
        skip = ("progress", "completions", "final_check_tokens")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def fit_hsi_checked(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    config: HSIConfig,
    *,
    final_check_tokens: int = 0,
    completions: Sequence[LabelledCompletion] = (),
    run_dir: Path | None = None,
    progress: bool = True,
) -> Steering:
    """`fit_hsi`, then (`final_check_tokens` > 0) the generated-answer final check on the validation
    items, unmodified vs steered (`finesteer.evaluate.ab.generation_check`), stored as the metadata's
    `final_check` and in `selection.json`. Fitting itself never generates. The selection's verdict
    (`finesteer.methods.verdict`: does the choice beat its random-head control on validation, given
    every candidate tried?) is added as `verdict` / `selection_verdict` and said on the terminal."""
    if isinstance(final_check_tokens, bool) or final_check_tokens < 0:
        raise HSIConfigError(f"final_check_tokens must be ≥ 0, got {final_check_tokens!r}")
    fitted, selection = fit_hsi_selection(
        lm, train_items, val_items, config, completions=completions, run_dir=run_dir, progress=progress
    )
    attach_verdict(fitted.metadata, selection.evidence, "HSI selection")
    if run_dir is not None:
        write_json_atomic(Path(run_dir) / "selection.json", fitted.metadata, indent=1)
    if final_check_tokens == 0 or fitted.intervention is None:
        return fitted
    items = letter_balanced(val_items, strict=False) if config.balance_letters else list(val_items)
    fitted.metadata["final_check"] = generation_check(
        lm, items, fitted.intervention, final_check_tokens, config.prompt, config.batch_size, progress
    )
    if run_dir is not None:
        write_json_atomic(Path(run_dir) / "selection.json", fitted.metadata, indent=1)
    return fitted


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
        config = HSIConfig.from_settings(s.config_fields())
        fitted = fit_hsi_checked(
            lm,
            list(behaviour.train),
            list(behaviour.val),
            config,
            final_check_tokens=s.final_check_tokens,
            completions=s.completions,
            run_dir=run_dir,
            progress=s.progress,
        )
        if run_dir is not None:
            plot_sweep_folder(run_dir, rank_by=config.rank_by, top=config.k)
        return save_fitted(fitted.bound(lm), run_dir)


__all__ = ["HSI", "HSISettings", "fit_hsi_checked"]
