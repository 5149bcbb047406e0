"""The A/B comparison experiment: fit several methods on one behaviour and evaluate them side by side.

What `finesteer compare MODEL --data BEHAVIOUR` runs: split the behaviour's data (seeded), balance the
test letters if asked, load the harmless prompts for the KL column, choose the judge, name the
output folder, and hand one `PendingSteering` per method (fitted only if not already finished
there) to `finesteer.evaluate.compare.compare_setups`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesteer.data import load_dataset
from finesteer.data.balance import letter_balanced
from finesteer.evaluate.compare import CompareSettings, ComparisonResult, PendingSteering, compare_setups
from finesteer.evaluate.compare_controls import ControlBuilder
from finesteer.evaluate.compare_result import TABLE_COLUMNS, table_row
from finesteer.evaluate.eval_sets import load_eval_sets
from finesteer.evaluate.judge_choice import DEFAULT_LOCAL_JUDGE, JudgeKind, make_judge
from finesteer.fit.controls import CONTROL_SEEDS, Control, control_kind, controls_for
from finesteer.fit.hsi_directions import cached_directions
from finesteer.fit.steering import Steering
from finesteer.generation import GenerationConfig
from finesteer.methods import BehaviourData, MethodChoice, MethodError, load_behaviour_data, resolve_method
from finesteer.models.loading import LoadedModel, load_model
from finesteer.report.forest import comparison_report
from finesteer.runs.lock import FolderLock

DEFAULT_METHODS: tuple[str, ...] = ("baseline", "prompt", "caa", "iti", "lora", "hsi")

Log = Callable[[str], None]


def slug(text: str) -> str:
    """A file-name-safe form of a model or dataset name (a path's last part)."""
    return re.sub(r"[^A-Za-z0-9._]+", "_", Path(text).name if "/" in text else text)


def default_out_dir(model: str, data: str) -> Path:
    return Path("runs") / f"compare-{slug(model)}-{slug(data)}"


@dataclass(frozen=True)
class ABComparison:
    """Everything `finesteer compare` (A/B task) takes besides the model."""

    data: str = "coordinate-other-ais"
    methods: Sequence[str] = DEFAULT_METHODS
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    val_fraction: float = 0.2
    seed: int = 0
    train_limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    open_ended_limit: int | None = None
    balanced: bool = True  # the A/B test split in both option orders (a letter bias scores 0.5)
    harmless_data: str = "alpaca"
    harmless_limit: int = 32
    max_new_tokens: int = 64
    ab_max_new_tokens: int = 32
    judge: JudgeKind = "auto"
    judge_model: str = DEFAULT_LOCAL_JUDGE
    batch_size: int = 8
    device: str = "cpu"  # where the model runs and its dtype (`models.load_model`)
    dtype: str = "float32"
    eval_data: Sequence[str] = ()
    controls: int = len(CONTROL_SEEDS)

    def choices(self) -> list[MethodChoice]:
        """The methods, resolved (unknown names and settings for absent methods are errors)."""
        if not self.methods:
            raise MethodError("--methods is empty")
        choices = [resolve_method(n, "ab") for n in self.methods]
        unknown = sorted(set(self.settings) - {c.label for c in choices})
        if unknown:
            raise MethodError(f"--settings names method(s) {unknown} that are not in --methods")
        return choices

    def behaviour_data(self) -> BehaviourData:
        data = load_behaviour_data(
            self.data,
            val_fraction=self.val_fraction,
            train_limit=self.train_limit,
            val_limit=self.val_limit,
            test_limit=self.test_limit,
            open_ended_limit=self.open_ended_limit,
            seed=self.seed,
        )
        if not self.balanced:
            return data
        test = tuple(letter_balanced(data.test_ab, strict=False))
        return dataclasses.replace(data, test_ab=test, meta={**data.meta, "balanced": True})

    def harmless_prompts(self) -> list[str]:
        if not self.harmless_limit:
            return []
        return [item.prompt for item in load_dataset(self.harmless_data, limit=self.harmless_limit)]  # type: ignore[union-attr]

    def compare_settings(self) -> CompareSettings:
        return CompareSettings(
            open_ended=GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size),
            ab_generation=GenerationConfig(max_new_tokens=self.ab_max_new_tokens, batch_size=self.batch_size),
            batch_size=self.batch_size,
            controls=self.controls,
        )


def control_builder(lm: LoadedModel, data: BehaviourData, folder: Path, log: Log) -> ControlBuilder:
    """Each method's matched controls (`finesteer.fit.controls.controls_for`). Head steering needs
    every head's direction and σ: fitted once on the train split (cached in `folder`), so a random
    head is pushed by the method's α in units of its own σ."""
    directions: list[Any] = []

    def build(steering: Steering, seeds: Sequence[int]) -> list[Control]:
        if control_kind(steering.intervention) == "random-heads" and not directions:
            log("fitting every head's direction on the train split for the random-head controls")
            folder.mkdir(parents=True, exist_ok=True)
            directions.append(cached_directions(lm, data.train, folder))
        info = lm.info
        head_directions = directions[0] if directions else None
        return controls_for(
            steering.intervention, info.n_layers, info.n_heads, seeds, directions=head_directions
        )

    return build


def write_report(comparison: ComparisonResult, folder: Path) -> Path:
    """`folder/report.html`: verdicts first, the table with intervals, error bars and the forest plot."""
    rows = [table_row(name, row) for name, row in comparison.methods.items()]
    return comparison_report(comparison.to_json(), TABLE_COLUMNS, rows, folder)


def pending_steerings(
    choices: Sequence[MethodChoice],
    lm: LoadedModel,
    data: BehaviourData,
    settings: Mapping[str, Mapping[str, Any]],
    folder: Path,
    log: Log,
) -> list[PendingSteering]:
    """One deferred fit per method; its resume key: the method's identity, settings and data splits."""

    def build(choice: MethodChoice) -> Callable[[], Steering]:
        def fit() -> Steering:
            log(f"[bold]{choice.label}[/]: fitting")
            t0 = time.perf_counter()
            steering = choice.fit(lm, data, settings.get(choice.label, {}), folder / "fits" / choice.label)
            steering.metadata.setdefault("fit_seconds_total", round(time.perf_counter() - t0, 1))
            log(f"[bold]{choice.label}[/]: fitted in {time.perf_counter() - t0:.0f}s; evaluating")
            return steering

        return fit

    return [
        PendingSteering(
            c.label,
            build(c),
            key={"target": c.key, "settings": dict(settings.get(c.label, {})), "data": data.summary()},
        )
        for c in choices
    ]


def run_ab_comparison(
    model: str, options: ABComparison, out: Path | None = None, *, log: Log = lambda _: None
) -> ComparisonResult:
    """Fit and evaluate every method of `options` on `model`; resumable in `out` (locked while written:
    a second comparison into the same folder is refused before loading)."""
    choices = options.choices()
    for choice in choices:  # settings errors before the model is loaded
        choice.settings(options.settings.get(choice.label, {}))
    behaviour = options.behaviour_data()
    harmless = options.harmless_prompts()
    extra = load_eval_sets(options.eval_data, balanced=options.balanced)  # checked before the model loads
    folder = out or default_out_dir(model, options.data)
    started = time.perf_counter()
    with FolderLock(folder):  # checked writable and locked before the load; held to the end
        lm = load_model(model, device=options.device, dtype=options.dtype)
        judge, judge_name = (None, "none (no open-ended questions)")
        if behaviour.open_ended:
            judge, judge_name = make_judge(options.data, options.judge, local_model=options.judge_model)
        log(
            f"comparing {', '.join(c.label for c in choices)} on {model} · {options.data}: "
            f"train {len(behaviour.train)}, val {len(behaviour.val)}, A/B test {len(behaviour.test_ab)}, "
            f"open-ended {len(behaviour.open_ended)}; judge {judge_name}; results in {folder}"
        )

        def report(name: str, row: dict[str, Any], resumed: bool) -> None:
            seconds = row.get("eval_seconds", 0)
            how = "already finished, skipped" if resumed else f"evaluated in {seconds:.0f}s"
            log(
                f"[bold]{name}[/]: {how}: A/B {row['ab_matching_rate']:.2f} (prob), "
                f"open-ended {row.get('open_ended_score')}"
            )

        comparison = compare_setups(
            pending_steerings(choices, lm, behaviour, options.settings, folder, log),
            reference=lm,
            ab_items=list(behaviour.test_ab),
            open_ended_items=list(behaviour.open_ended),
            harmless_prompts=harmless,
            judge=judge,
            judge_name=judge_name,
            settings=options.compare_settings(),
            out_dir=folder,
            info={"model": model, "data": options.data, "data_splits": behaviour.summary()},
            on_method=report,
            eval_sets=extra,
            make_controls=control_builder(lm, behaviour, folder / "controls", log),
        )
        log(f"report: {write_report(comparison, folder)}")
        log(f"done in {time.perf_counter() - started:.0f}s")
        return comparison


__all__ = [
    "DEFAULT_METHODS",
    "ABComparison",
    "MethodError",
    "control_builder",
    "default_out_dir",
    "pending_steerings",
    "run_ab_comparison",
    "slug",
    "write_report",
]
