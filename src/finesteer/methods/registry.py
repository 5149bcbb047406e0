"""The one method registry, shared by the A/B comparison (`compare`) and the refusal experiment.

`METHODS` maps each registered name to its `Method`. The names a user types (`--methods`) are
resolved at the boundary by `resolve_method(name, task)` into a `MethodChoice`: a registered method
plus fixed settings. So the refusal experiment's `sta_amplitude` is `sta` with `mode="amplitude"`,
`sae_all` is `sta` with `mode="all"`, `prompt_sta` is `sta` on the system prompt, and its `caa` is
`caa_answer_mean` (the STA paper's baseline), not the A/B `caa` (answer-letter vector, layer sweep).
A method outside finesteer is named by its "module:Class" target (a class with `name`,
`Settings` and `fit`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from finesteer.fit.steering import Steering
from finesteer.methods.base import Method, MethodSettings
from finesteer.methods.caa import CAA
from finesteer.methods.data import BehaviourData, ContrastData
from finesteer.methods.errors import MethodError
from finesteer.methods.hsi import HSI
from finesteer.methods.iti import ITI
from finesteer.methods.lora import LoRA
from finesteer.methods.prompt import Baseline, Prompt
from finesteer.methods.sta import STA, CAAAnswerMean

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

Task = Literal["ab", "refusal"]
TASKS: tuple[str, ...] = ("ab", "refusal")

METHODS: Mapping[str, Method] = MappingProxyType(
    {m.name: m for m in (Baseline(), Prompt(), CAA(), ITI(), LoRA(), HSI(), STA(), CAAAnswerMean())}
)
"""Every built-in method by its registered name."""


@dataclass(frozen=True)
class Alias:
    """A user-facing name for a registered method with some settings fixed."""

    method: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None


ALIASES: Mapping[Task, Mapping[str, Alias]] = MappingProxyType(
    {
        "ab": MappingProxyType(
            {
                # `key`: the method identity recorded in resume keys before the registries were
                # unified, so run folders written then still resume.
                **{n: Alias(n, key=f"finesteer.methods:{n}_method") for n in ("baseline", "prompt", "caa", "iti", "lora", "hsi")},  # noqa: E501
                "sta": Alias("sta", key="finesteer.fit.sta_methods:sta_method"),
                "sae_all": Alias("sta", {"mode": "all"}, key="finesteer.fit.sta_methods:sae_all_method"),
                "sta_amplitude": Alias("sta", {"mode": "amplitude"}),
                "sta_frequency": Alias("sta", {"mode": "frequency"}),
                "sta_output": Alias("sta", {"select": "output"}),
            }
        ),
        "refusal": MappingProxyType(
            {
                "baseline": Alias("baseline"),
                "prompt": Alias("prompt"),
                "caa": Alias("caa_answer_mean"),
                "caa_answer_mean": Alias("caa_answer_mean"),
                "sae_all": Alias("sta", {"mode": "all"}),
                "sta": Alias("sta"),
                "sta_amplitude": Alias("sta", {"mode": "amplitude"}),
                "sta_frequency": Alias("sta", {"mode": "frequency"}),
                "sta_output": Alias("sta", {"select": "output"}),
                "prompt_caa": Alias("caa_answer_mean", {"source": "system_prompt"}),
                "prompt_sta": Alias("sta", {"source": "system_prompt"}),
            }
        ),
    }
)
"""Per task, the names `--methods` accepts besides the registered ones, and what each means."""


@dataclass(frozen=True)
class MethodChoice:
    """A name as the user wrote it, resolved: the method, its fixed settings, its resume identity."""

    label: str
    method: Method
    fixed: Mapping[str, Any] = field(default_factory=dict)
    key: str = ""

    def settings(self, given: Mapping[str, Any] | MethodSettings | None = None) -> MethodSettings:
        """The method's settings: `given` (a mapping or an instance) plus the name's fixed ones."""
        values = given.to_dict() if isinstance(given, MethodSettings) else dict(given or {})
        clash = sorted(k for k in self.fixed if k in values and values[k] != self.fixed[k])
        if clash:
            raise MethodError(f"'{self.label}' fixes setting(s) {clash}; name another method to change them")
        return self.method.Settings.parse({**values, **self.fixed})

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: Mapping[str, Any] | MethodSettings | None = None,
        run_dir: str | Path | None = None,
    ) -> Steering:
        """Fit and name the steering after the label."""
        parsed = self.settings(settings)
        folder = Path(run_dir) if run_dir is not None else None
        return self.method.fit(lm, data, parsed, folder).renamed(self.label)


def _external(target: str) -> MethodChoice:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise MethodError(f"method target {target!r} must be 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MethodError(f"method '{target}': cannot import {module_name} ({exc})") from exc
    cls = getattr(module, attr, None)
    method = cls() if isinstance(cls, type) else cls
    if not all(hasattr(method, a) for a in ("name", "Settings", "fit")):
        raise MethodError(f"method '{target}' is not a Method (needs name, Settings and fit)")
    return MethodChoice(attr, method, key=target)  # type: ignore[arg-type]


def method_names(task: Task = "ab") -> list[str]:
    """The names `--methods` accepts for `task` (registered names and the task's aliases)."""
    return list(dict.fromkeys([*ALIASES[task], *METHODS]))


def resolve_method(name: str, task: Task = "ab") -> MethodChoice:
    """A user-facing method name (or a "module:Class" target) for `task`, resolved."""
    if task not in TASKS:
        raise MethodError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    alias = ALIASES[task].get(name)
    if alias is not None:
        return MethodChoice(name, METHODS[alias.method], alias.fixed, alias.key or alias.method)
    if name in METHODS:
        return MethodChoice(name, METHODS[name], key=name)
    if ":" in name:
        return _external(name)
    raise MethodError(
        f"unknown method '{name}'; known: {', '.join(method_names(task))} (or a 'module:Class' target)"
    )


def fit_method(
    name: str,
    lm: LoadedModel,
    data: BehaviourData | ContrastData,
    settings: Mapping[str, Any] | MethodSettings | None = None,
    run_dir: str | Path | None = None,
    *,
    task: Task = "ab",
) -> Steering:
    """Resolve `name` for `task`, fit it, and return its steering (named `name`)."""
    return resolve_method(name, task).fit(lm, data, settings, run_dir)


__all__ = [
    "ALIASES",
    "METHODS",
    "TASKS",
    "Alias",
    "MethodChoice",
    "Task",
    "fit_method",
    "method_names",
    "resolve_method",
]
