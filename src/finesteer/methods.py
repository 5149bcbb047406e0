"""Registry of steering methods, so a comparison can run any of them by name.

Every method has one signature, `fit(lm, data, settings, run_dir) -> SteeringSetup`: it gets the
unmodified model, the behaviour's data splits (`BehaviourData`), a dict of method settings (passed
to the underlying `fit_*` function, unknown names rejected) and a folder for its files. Methods are
imported lazily ("module:function" targets), so listing them costs nothing and a method whose
optional dependency is missing fails only when it is used. A method outside finesteer is named by
its target directly (`mypackage.steering:fit_mine`) without editing this file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from finesteer.data.items import ABItem, OpenEndedItem

if TYPE_CHECKING:
    from finesteer.evaluate.compare import SteeringSetup
    from finesteer.models.loading import LoadedModel

FitMethod = Callable[["LoadedModel", "BehaviourData", Mapping[str, Any], "Path | None"], "SteeringSetup"]


class MethodError(ValueError):
    """An unknown method, a method setting it does not take, or unusable behaviour data."""


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourData:
    """The splits every method of a comparison uses for one behaviour.

    `train` / `val` divide the behaviour's `generate` split (seeded shuffle), `test_ab` and
    `open_ended` are its test splits. Methods fit on train, choose hyper-parameters on val; the
    comparison evaluates on the test splits only.
    """

    behaviour: str
    train: tuple[ABItem, ...]
    val: tuple[ABItem, ...]
    test_ab: tuple[ABItem, ...]
    open_ended: tuple[OpenEndedItem, ...] = ()
    seed: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val", "test_ab"):
            if not getattr(self, name):
                raise MethodError(f"behaviour data '{self.behaviour}': the {name} split is empty")
        # Ids restart at 0 in every split of the CAA files, so leakage is checked on the questions.
        train = {i.question for i in self.train}
        leaked = train & ({i.question for i in self.val} | {i.question for i in self.test_ab})
        if leaked:
            example = sorted(leaked)[0][:80]
            raise MethodError(
                f"{len(leaked)} question(s) are both in train and in val/test, e.g. {example!r}"
            )

    def summary(self) -> dict[str, Any]:
        def digest(items: Sequence[ABItem | OpenEndedItem]) -> str:
            text = json.dumps([(i.id, i.question) for i in items])
            return hashlib.sha256(text.encode()).hexdigest()[:12]

        return {
            "behaviour": self.behaviour,
            "seed": self.seed,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test_ab": len(self.test_ab),
            "n_open_ended": len(self.open_ended),
            "hashes": {
                "train": digest(self.train),
                "val": digest(self.val),
                "test_ab": digest(self.test_ab),
                "open_ended": digest(self.open_ended),
            },
            **dict(self.meta),
        }


def _limit(items: list[Any], limit: int | None, what: str) -> list[Any]:
    if limit is None:
        return items
    if limit < 1:
        raise MethodError(f"{what} limit must be ≥ 1, got {limit}")
    return items[:limit]


def load_behaviour_data(
    behaviour: str,
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    test_limit: int | None = None,
    open_ended_limit: int | None = None,
    seed: int = 0,
) -> BehaviourData:
    """Splits of a CAA-style behaviour dataset (`generate`, `test_ab`, `test_open_ended`).

    `generate` is shuffled with `seed` and its first `val_fraction` becomes val, the rest train;
    limits then keep the first N of each split (so a smaller run uses a subset of a larger one).
    """
    from finesteer.data.catalog import dataset_info, load_dataset

    if not 0 < val_fraction < 1:
        raise MethodError(f"val_fraction must be in (0, 1), got {val_fraction}")
    splits = dataset_info(behaviour).splits
    missing = [s for s in ("generate", "test_ab") if s not in splits]
    if missing:
        raise MethodError(
            f"dataset '{behaviour}' has splits {list(splits)}; a comparison needs 'generate' (train/val) "
            f"and 'test_ab' (and optionally 'test_open_ended'); missing {missing}"
        )
    generate = list(load_dataset(behaviour, split="generate"))
    if not all(isinstance(i, ABItem) for i in generate):
        raise MethodError(f"dataset '{behaviour}': the generate split is not A/B items")
    order = list(range(len(generate)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(generate)))
    if n_val >= len(generate):
        raise MethodError(f"dataset '{behaviour}' has too few generate items ({len(generate)}) to split")
    val = [generate[i] for i in order[:n_val]]
    train = [generate[i] for i in order[n_val:]]
    test_ab = list(load_dataset(behaviour, split="test_ab"))
    open_ended = list(load_dataset(behaviour, split="test_open_ended")) if "test_open_ended" in splits else []
    return BehaviourData(
        behaviour=behaviour,
        train=tuple(_limit(train, train_limit, "train")),
        val=tuple(_limit(val, val_limit, "val")),
        test_ab=tuple(_limit(test_ab, test_limit, "test")),
        open_ended=tuple(_limit(open_ended, open_ended_limit, "open-ended")),
        seed=seed,
        meta={"val_fraction": val_fraction, "n_generate": len(generate)},
    )


# --- registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A method name, where its fit function lives ("module:function") and what it is."""

    name: str
    target: str
    description: str

    def load(self) -> FitMethod:
        module_name, _, attr = self.target.partition(":")
        if not module_name or not attr:
            raise MethodError(f"method target {self.target!r} must be 'module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MethodError(f"method '{self.name}': cannot import {module_name} ({exc})") from exc
        fit = getattr(module, attr, None)
        if not callable(fit):
            raise MethodError(f"method '{self.name}': {self.target} is not a function")
        return fit


METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            MethodSpec("baseline", "finesteer.methods:baseline_method", "the unmodified model"),
            MethodSpec("prompt", "finesteer.methods:prompt_method", "CAA's behavioural system prompt"),
            MethodSpec(
                "caa", "finesteer.methods:caa_method", "CAA residual vector, layer × multiplier on val"
            ),
            MethodSpec("iti", "finesteer.methods:iti_method", "ITI: probe-ranked heads, mass-mean direction"),
            MethodSpec("lora", "finesteer.methods:lora_method", "LoRA fine-tuning on the matching answers"),
            MethodSpec("hsi", "finesteer.methods:hsi_method", "HSI: sweep-selected heads, shared α"),
            MethodSpec("sae_all", "finesteer.fit.sta_methods:sae_all_method", "all SAE atoms' Δa, CAA norm"),
            MethodSpec("sta", "finesteer.fit.sta_methods:sta_method", "Steering Target Atoms (SAE)"),
        )
    }
)
"""Built-in methods. Entries added here (e.g. `sta`) appear in `finesteer compare --methods`."""


def resolve_method(name: str) -> MethodSpec:
    """A registered method, or an external one named by its "module:function" target."""
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    if ":" in name:
        return MethodSpec(name.rsplit(":", 1)[1], name, f"external method {name}")
    raise MethodError(f"unknown method '{name}'; known: {', '.join(METHODS)} (or a 'module:function' target)")


def fit_method(
    name: str,
    lm: LoadedModel,
    data: BehaviourData,
    settings: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
) -> SteeringSetup:
    """Fit one method and return its setup (named after the method)."""
    spec = resolve_method(name)
    folder = Path(run_dir) if run_dir is not None else None
    setup = spec.load()(lm, data, dict(settings or {}), folder)
    setup.name = spec.name
    return setup


def call_with_settings(fn: Callable[..., Any], settings: Mapping[str, Any], *args: Any, **fixed: Any) -> Any:
    """Call `fn(*args, **fixed, **settings)`, naming the settings `fn` does not take."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        taken = {n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
        unknown = sorted(set(settings) - taken - set(fixed))
        if unknown:
            accepted = sorted(taken - set(fixed) - {"lm", "train_items", "val_items"})
            raise MethodError(
                f"{fn.__name__} does not take setting(s) {unknown}; it accepts {', '.join(accepted)}"
            )
    clash = sorted(set(settings) & set(fixed))
    if clash:
        raise MethodError(f"setting(s) {clash} are set by the comparison and cannot be overridden")
    return fn(*args, **fixed, **settings)


def _with_prompt(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with `system` / `prefill` turned into the `prompt` (an `ABPrompt`) fits take."""
    from finesteer.scoring.ab import ABPrompt

    out = {k: v for k, v in settings.items() if k not in ("system", "prefill")}
    if "system" in settings or "prefill" in settings:
        out["prompt"] = ABPrompt(settings.get("system"), settings.get("prefill", "("))
    return out


# --- built-in methods -----------------------------------------------------------------------------


def _setup(name: str, lm: LoadedModel, **kwargs: Any) -> SteeringSetup:
    from finesteer.evaluate.compare import SteeringSetup

    return SteeringSetup(name, lm, **kwargs)


def _from_fitted(fitted: Any, lm: LoadedModel, run_dir: Path | None) -> SteeringSetup:
    """A setup from a `FittedIntervention`, saving it as an artifact in run_dir."""
    if run_dir is not None:
        fitted.save(run_dir / "artifact", lm)
    return _setup(fitted.name, lm, intervention=fitted.intervention, metadata=dict(fitted.metadata))


def baseline_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """The unmodified model (takes no settings)."""
    if settings:
        raise MethodError(f"baseline takes no settings, got {sorted(settings)}")
    return _setup("baseline", lm, metadata={"method": "baseline"})


def prompt_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """The behaviour's system prompt (settings: direction, system_prompt)."""
    from finesteer.fit.prompting import fit_prompting

    baseline = call_with_settings(fit_prompting, settings, data.behaviour)
    return _setup("prompt", lm, system_prompt=baseline.system_prompt, metadata=dict(baseline.metadata))


def caa_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """CAA (settings: any keyword of `fit_caa`, e.g. layers, multipliers, direction)."""
    from finesteer.fit.caa import fit_caa

    fitted = call_with_settings(
        fit_caa, _with_prompt(settings), lm, list(data.train), list(data.val), run_dir=run_dir
    )
    return _from_fitted(fitted, lm, run_dir)


def hsi_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """HSI (settings: any field of `HSIConfig`, e.g. k, alphas, n_sweep; system, prefill, progress)."""
    from finesteer.fit.hsi import HSIConfig, fit_hsi
    from finesteer.report.sweep import plot_sweep_folder

    rest = {key: settings[key] for key in ("progress", "completions") if key in settings}
    config = HSIConfig.from_settings({k: v for k, v in settings.items() if k not in rest})
    fitted = fit_hsi(lm, list(data.train), list(data.val), config, run_dir=run_dir, **rest)
    if run_dir is not None:
        plot_sweep_folder(run_dir, rank_by=config.rank_by, top=config.k)
    return _from_fitted(fitted, lm, run_dir)


def iti_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """ITI (settings: any keyword of `fit_iti`, e.g. k, alphas)."""
    from finesteer.fit.iti import fit_iti
    from finesteer.report.probes import plot_probe_accuracy_folder

    fitted = call_with_settings(fit_iti, settings, lm, list(data.train), list(data.val), run_dir=run_dir)
    if run_dir is not None:
        plot_probe_accuracy_folder(run_dir)
    return _from_fitted(fitted, lm, run_dir)


def lora_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """LoRA fine-tuning (settings: fields of `LoRASettings`, plus system / prefill / progress)."""
    from dataclasses import fields

    from finesteer.fit.lora import LoRASettings, fit_lora

    names = {f.name for f in fields(LoRASettings)}
    hyper = {k: v for k, v in settings.items() if k in names}
    if isinstance(hyper.get("target_modules"), list):
        hyper["target_modules"] = tuple(hyper["target_modules"])
    rest = {k: v for k, v in settings.items() if k not in names}
    tuned = call_with_settings(
        fit_lora, _with_prompt(rest), lm, list(data.train), LoRASettings(**hyper), run_dir=run_dir
    )
    return _setup("lora", tuned.lm, metadata=dict(tuned.metadata))


__all__ = [
    "METHODS",
    "BehaviourData",
    "FitMethod",
    "MethodError",
    "MethodSpec",
    "baseline_method",
    "caa_method",
    "call_with_settings",
    "fit_method",
    "hsi_method",
    "iti_method",
    "load_behaviour_data",
    "lora_method",
    "prompt_method",
    "resolve_method",
]
