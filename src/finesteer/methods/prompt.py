"""The two reference points of every comparison: the unmodified model and a behavioural system prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from finesteer.fit.prompting import Direction, fit_prompting
from finesteer.fit.steering import Steering
from finesteer.methods.base import MethodSettings
from finesteer.methods.data import BehaviourData, ContrastData
from finesteer.methods.errors import MethodError

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel


@dataclass(frozen=True)
class BaselineSettings(MethodSettings):
    """The baseline takes no settings."""

    method = "baseline"


class Baseline:
    """The unmodified model."""

    name: ClassVar[str] = "baseline"
    description: ClassVar[str] = "the unmodified model"
    Settings: ClassVar[type[MethodSettings]] = BaselineSettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: BaselineSettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        BaselineSettings.parse(settings)
        metadata = {"method": "baseline"} if isinstance(data, BehaviourData) else {}
        return Steering("baseline", metadata=metadata, lm=lm)


@dataclass(frozen=True)
class PromptSettings(MethodSettings):
    """`direction` picks the behaviour's towards/away text; `system_prompt` replaces it."""

    method = "prompt"
    direction: Direction = "towards"
    system_prompt: str | None = None


class Prompt:
    """A system prompt: the behaviour's (CAA's texts), or the contrast data's (e.g. the refusal prompt)."""

    name: ClassVar[str] = "prompt"
    description: ClassVar[str] = "CAA's behavioural system prompt"
    Settings: ClassVar[type[MethodSettings]] = PromptSettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: PromptSettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = PromptSettings.parse(settings)
        if isinstance(data, ContrastData) and s.system_prompt is None:
            if data.system_prompt is None:
                raise MethodError(f"contrast data '{data.behaviour}' has no system prompt for 'prompt'")
            return Steering("prompt", metadata={"method": "prompt"}, system_prompt=data.system_prompt, lm=lm)
        baseline = fit_prompting(data.behaviour, direction=s.direction, system_prompt=s.system_prompt)
        meta = dict(baseline.metadata)
        return Steering("prompt", metadata=meta, system_prompt=baseline.system_prompt, lm=lm)


__all__ = ["Baseline", "BaselineSettings", "Prompt", "PromptSettings"]
