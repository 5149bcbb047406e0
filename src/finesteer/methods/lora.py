"""LoRA fine-tuning on the behaviour-matching answers: the steering is a merged fine-tuned copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.fit.lora import Completion, LoRASettings, fit_lora
from finesteer.fit.steering import Steering
from finesteer.methods.base import MethodSettings
from finesteer.methods.data import BehaviourData, ContrastData, require_behaviour
from finesteer.scoring.ab import ABPrompt

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

_DEFAULT = LoRASettings()


@dataclass(frozen=True)
class LoRAMethodSettings(MethodSettings):
    """`finesteer.fit.lora.LoRASettings`' hyper-parameters plus `fit_lora`'s system / prefill / progress."""

    method = "lora"
    rank: int = _DEFAULT.rank
    alpha: float = _DEFAULT.alpha
    dropout: float = _DEFAULT.dropout
    target_modules: str | tuple[str, ...] = _DEFAULT.target_modules
    learning_rate: float = _DEFAULT.learning_rate
    max_steps: int = _DEFAULT.max_steps
    batch_size: int = _DEFAULT.batch_size
    warmup_steps: int = _DEFAULT.warmup_steps
    weight_decay: float = _DEFAULT.weight_decay
    completion: Completion = _DEFAULT.completion
    seed: int = _DEFAULT.seed
    system: str | None = None
    prefill: str = "("
    progress: bool = True

    def hyper_parameters(self) -> LoRASettings:
        return LoRASettings(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            completion=self.completion,
            seed=self.seed,
        )


class LoRA:
    """LoRA fine-tuning on the matching answers of the train split."""

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA fine-tuning on the matching answers"
    Settings: ClassVar[type[MethodSettings]] = LoRAMethodSettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: LoRAMethodSettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = LoRAMethodSettings.parse(settings)
        behaviour = require_behaviour(self.name, data)
        tuned = fit_lora(
            lm,
            list(behaviour.train),
            s.hyper_parameters(),
            prompt=ABPrompt(s.system, s.prefill),
            run_dir=run_dir,
            progress=s.progress,
        )
        return Steering("lora", metadata=dict(tuned.metadata), lm=tuned.lm)


__all__ = ["LoRA", "LoRAMethodSettings"]
