"""The refusal frontier experiment: fit the named methods once, sweep λ, ablate top-k heads of a
ranking against random heads, add any steerings the caller brings (e.g. a directional ablation),
and measure every point with `evaluate.frontier`; then the table, the equal-cost comparison, two
charts and `frontier.json` in the output folder.

`frontier_experiment` is the library call behind `finesteer frontier` (everything from names, checked
before the model loads); `run_frontier_experiment` takes a loaded model (and SAE) and extra named
`Steering`s; `run` is the `finesteer run recipe.yaml` step runner for a `FrontierRecipe`.
Evaluation prompts are held out: JailbreakBench (harmful), XSTest safe, refusal-direction harmless
*test* split (KL); the methods fit on `fit.refusal_pairs` triples, which exclude them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.data import load_dataset
from finesteer.evaluate.compare import ComparisonError
from finesteer.evaluate.frontier import (
    GOALS,
    FrontierEntry,
    FrontierPrompts,
    FrontierSettings,
    run_frontier,
)
from finesteer.evaluate.frontier_entries import (
    baseline_entry,
    direction_control_entries,
    head_ablation_entries,
    swept_entries,
)
from finesteer.evaluate.frontier_equal import at_equal_cost
from finesteer.evaluate.refusal_compare import RefusalSettings
from finesteer.fit.refusal_direction import RefusalDirection
from finesteer.fit.refusal_pairs import REFUSAL_SYSTEM_PROMPT, refusal_triples
from finesteer.fit.steering import Steering
from finesteer.generation import GenerationConfig
from finesteer.methods import ContrastData, resolve_method
from finesteer.models.loading import load_model
from finesteer.recipes.config import FrontierRecipe
from finesteer.recipes.frontier_heads import head_steering
from finesteer.recipes.refusal import evaluation_sets, prompt_messages, spread
from finesteer.recipes.run import RunFolder
from finesteer.recipes.summary import finish_report
from finesteer.report.frontier import equal_cost_table, frontier_report, frontier_table, plot_frontier
from finesteer.runs.files import write_json_atomic
from finesteer.sae.io import load_sae
from finesteer.sites import Head, parse_heads

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel
    from finesteer.sae.model import SparseAutoencoder

RESULT_FILE = "frontier.json"
NEEDS_SAE = ("caa", "caa_answer_mean", "sae_all", "sta", "sta_output", "sta_amplitude", "sta_frequency")


@dataclass(frozen=True)
class FrontierExperiment:
    """What the frontier measures: methods and λs (steering), a head ranking and its ks (ablation),
    the goal, data sizes, decoding and judge."""

    methods: tuple[str, ...] = ("baseline", "prompt", "caa", "sae_all", "sta", "sta_output")
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5)
    goal: str = "induce"
    heads: tuple[Head, ...] = ()
    ks: tuple[int, ...] = (1, 3, 8)
    head_name: str = "heads"
    rankings: tuple[tuple[str, tuple[Head, ...]], ...] = ()
    directions: tuple[str, ...] = ()
    ablation_mode: str = "ua"
    seeds: tuple[int, ...] = (0, 1, 2)
    direction_controls_at: float | None = None
    head_steer_k: int = 0
    head_steer_alpha: float = 8.0
    n_harmful: int = 50
    n_harmless: int = 50
    n_kl: int = 50
    n_mc: int = 0
    n_pairs: int = 160
    trim: float = 0.35
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int = 32
    batch_size: int = 25
    judge: str = "gcg+"

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ComparisonError(f"unknown --goal {self.goal!r}; choose {', '.join(GOALS)}")
        for name in self.methods:
            resolve_method(name, "refusal")
        if any(not math.isfinite(x) for x in self.lambdas) or not self.lambdas:
            raise ComparisonError("--lambdas must be finite numbers (at least one)")
        ranked = self.head_rankings()
        names = [name for name, _ in ranked]
        if len(set(names)) != len(names):
            raise ComparisonError(f"head rankings need distinct names, got {names}")
        if ranked and any(k < 1 for k in self.ks):
            raise ComparisonError(f"--ks must be ≥ 1, got {list(self.ks)}")
        for name, heads in ranked:
            if not any(k <= len(heads) for k in self.ks):
                raise ComparisonError(
                    f"ranking {name!r} has {len(heads)} heads, fewer than every k in --ks {list(self.ks)}"
                )
        if ranked and not all(k <= len(ranked[0][1]) for k in self.ks):
            raise ComparisonError(
                f"--ks {list(self.ks)} must lie in 1..{len(ranked[0][1])} (the first ranking's length: "
                "its random-head controls cover every k)"
            )
        if len(set(self.seeds)) != len(self.seeds) or (ranked and len(self.seeds) < 1):
            raise ComparisonError(f"control seeds must be distinct and at least one, got {list(self.seeds)}")
        for n, what in (
            (self.n_harmful, "--n-harmful"),
            (self.n_harmless, "--n-harmless"),
            (self.n_kl, "--n-kl"),
        ):
            if n < 1:
                raise ComparisonError(f"{what} must be ≥ 1, got {n}")
        RefusalSettings(judge=self.judge)  # type: ignore[arg-type]

    def head_rankings(self) -> list[tuple[str, tuple[Head, ...]]]:
        """Every named head ranking, `heads` (as `head_name`) first: its top-k get the random controls."""
        first = [(self.head_name, self.heads)] if self.heads else []
        return first + [(name, tuple(heads)) for name, heads in self.rankings]

    @property
    def needs_sae(self) -> bool:
        return any(
            resolve_method(m, "refusal").method.name in ("sta", "caa_answer_mean") for m in self.methods
        )

    def settings(self) -> FrontierSettings:
        generation = GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return FrontierSettings(self.goal, RefusalSettings(generation, self.judge))  # type: ignore[arg-type]


def frontier_prompts(e: FrontierExperiment) -> FrontierPrompts:
    harmful, harmless = evaluation_sets(e.n_harmful, e.n_harmless)
    kl = spread(load_dataset("refusal-direction-harmless", "test"), e.n_kl)  # type: ignore[arg-type]
    mc = tuple(load_dataset("finesteer-mc", limit=e.n_mc)) if e.n_mc > 0 else ()
    return FrontierPrompts(tuple(harmful), tuple(harmless), tuple(i.prompt for i in kl), mc)  # type: ignore[arg-type]


def method_entries(
    lm: LoadedModel, sae: SparseAutoencoder | None, e: FrontierExperiment, folder: Path, sae_path: str | None
) -> list[FrontierEntry]:
    """Each method fitted once through the registry (task "refusal") and swept over λ; with
    `head_steer_k`, HSI-style steering of that many heads (α = `head_steer_alpha` × λ)."""
    n_ab = max(0, e.n_pairs // 5)
    by_prompt = any(resolve_method(m, "refusal").fixed.get("source") == "system_prompt" for m in e.methods)
    data = ContrastData(
        "refusal",
        tuple(refusal_triples(n_harmful=e.n_pairs - n_ab, n_ab=n_ab)),
        system_prompt=REFUSAL_SYSTEM_PROMPT,
        prompt_messages=tuple(prompt_messages(64)) if by_prompt else (),
        sae=sae,
        sae_path=sae_path,
        stats_path=folder / "atom_stats.safetensors",
    )
    entries: list[FrontierEntry] = []
    for name in e.methods:
        choice = resolve_method(name, "refusal")
        given = dict(e.method_settings.get(name, {}))
        if choice.method.name == "sta":
            given.setdefault("trim", e.trim)
        steering = choice.fit(lm, data, given)
        if name == "baseline":
            continue
        entries += swept_entries(steering, e.lambdas, name)
        if e.direction_controls_at is not None and steering.intervention is not None:
            entries += direction_control_entries(steering, e.direction_controls_at, e.seeds, name)
    if e.head_steer_k > 0:
        steer = head_steering(lm, data.triples, k=e.head_steer_k, alpha=e.head_steer_alpha)
        entries += swept_entries(steer, e.lambdas, "head_steer")
    return entries


def direction_entries(
    lm: LoadedModel, folders: Sequence[str], goal: str, lambdas: Sequence[float]
) -> list[FrontierEntry]:
    """Each saved refusal direction (`finesteer locate refusal-direction` folder) as the coarse
    reference: projected out at every layer (goal "remove", one point) or added at its layer and
    swept over λ (goal "induce")."""
    entries: list[FrontierEntry] = []
    for folder in folders:
        direction = RefusalDirection.load(folder, lm)
        label = f"direction:{Path(folder).name}"
        meta = {"direction": str(folder), "layer": direction.layer, "position": direction.position}
        if goal == "remove":
            edit = direction.ablation(lm.info.n_layers)
            name = f"{label}-ablation"
            entries += swept_entries(Steering(name, edit, {**meta, "op": "ablation"}, lm=lm), [1.0])
        else:
            steering = Steering(f"{label}-addition", direction.addition(), {**meta, "op": "addition"}, lm=lm)
            entries += swept_entries(steering, lambdas)
    return entries


def run_frontier_experiment(
    lm: LoadedModel,
    out_dir: str | Path,
    experiment: FrontierExperiment,
    *,
    sae: SparseAutoencoder | None = None,
    sae_path: str | None = None,
    extra: Sequence[Steering] = (),
    extra_lambdas: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit, measure (resumable per point) and write `frontier.json`, `frontier_kl.png` and
    `frontier_over_refusal.png`. `extra` steerings (bound to `lm` or not) join as their own series,
    swept over `extra_lambdas` when given (else measured as they are)."""
    e = experiment
    if e.needs_sae and sae is None:
        raise ComparisonError(
            f"methods {', '.join(m for m in e.methods if m in NEEDS_SAE)} need an SAE (--sae)"
        )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prompts = frontier_prompts(e)
    entries = [baseline_entry(lm), *method_entries(lm, sae, e, folder, sae_path)]
    for steering in extra:
        bound = steering if steering.lm is not None else steering.bound(lm)
        entries += swept_entries(bound, extra_lambdas or [1.0], steering.name)
    entries += direction_entries(lm, e.directions, e.goal, e.lambdas)
    for i, (name, heads) in enumerate(e.head_rankings()):
        ks = [k for k in e.ks if k <= len(heads)]
        seeds = e.seeds if i == 0 else ()
        entries += head_ablation_entries(lm, heads, ks, name=name, mode=e.ablation_mode, seeds=seeds)
    fitted_s = round(time.perf_counter() - started, 1)
    directional = [x.id for x in entries if x.series.startswith("direction:") and "ablation" in x.series]
    reference = directional[0] if directional and e.goal == "remove" else None
    table = run_frontier(lm, entries, prompts, e.settings(), folder, progress=progress, reference=reference)
    table["equal_over_refusal"] = at_equal_cost(table, cost="over_refusal")
    table["equal_kl"] = at_equal_cost(table, cost="kl")
    table.update(
        model=lm.name,
        sae=sae_path,
        n_harmful=len(prompts.harmful),
        n_harmless=len(prompts.harmless),
        n_kl=len(prompts.kl_prompts),
        n_mc=len(prompts.mc_items),
        sets={
            "harmful": "jailbreakbench (evenly spaced)",
            "over_refusal": "xstest safe (evenly spaced)",
            "kl": "refusal-direction-harmless test (evenly spaced)",
            "mc": "finesteer-mc",
        },
        experiment={k: v for k, v in e.__dict__.items()},
        timings={"fit_s": fitted_s, "total_s": round(time.perf_counter() - started, 1)},
    )
    plot_frontier(table, folder / "frontier_kl.png", cost="kl", title=f"{lm.name}: refusal frontier (KL)")
    plot_frontier(
        table,
        folder / "frontier_over_refusal.png",
        cost="over_refusal",
        title=f"{lm.name}: refusal frontier (over-refusal)",
    )
    write_json_atomic(folder / RESULT_FILE, table, indent=1)
    frontier_report(table, folder)
    return table


def frontier_experiment(
    model: str,
    out: Path,
    experiment: FrontierExperiment,
    sae: Path | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """`finesteer frontier`: load the SAE (when given) and the model, run the experiment (progress bars
    on stderr by default)."""
    if experiment.needs_sae and sae is None:
        raise ComparisonError("the steering methods read an SAE's layer and atoms: pass --sae FOLDER")
    loaded = load_sae(sae) if sae is not None else None
    lm = load_model(model, device=device, dtype=dtype)
    return run_frontier_experiment(
        lm, out, experiment, sae=loaded, sae_path=str(sae) if sae else None, progress=progress
    )


def summary(table: dict[str, Any]) -> dict[str, Any]:
    """The one-line-per-level answer: which method is best at equal over-refusal, and separated or not."""
    levels = table["equal_over_refusal"]["by_level"]
    return {
        f"best at over-refusal {lv['level']:.2f}": lv.get("best", "–")
        + (" (separated)" if lv.get("separated") else "")
        for lv in levels
    }


__all__ = [
    "NEEDS_SAE",
    "RESULT_FILE",
    "FrontierExperiment",
    "direction_entries",
    "frontier_experiment",
    "frontier_prompts",
    "method_entries",
    "run",
    "run_frontier_experiment",
    "summary",
]


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    """`finesteer run recipe.yaml` for a `FrontierRecipe`: one resumable step, then the report."""
    recipe: FrontierRecipe = run.recipe  # type: ignore[assignment]
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    run.pin(model_fingerprint=lm.fingerprint, model_info=lm.info.to_dict())
    heads = tuple(h for item in recipe.heads or [] for h in parse_heads(item))
    experiment = FrontierExperiment(
        methods=tuple(recipe.methods),
        lambdas=tuple(recipe.lambdas),
        goal=recipe.goal,
        heads=heads,
        rankings=tuple((name, tuple(parse_heads(text))) for name, text in recipe.rankings.items()),
        directions=tuple(recipe.directions),
        ks=tuple(recipe.ks) if heads or recipe.rankings else (),
        seeds=tuple(recipe.control_seeds),
        ablation_mode=recipe.ablation_mode,
        n_harmful=recipe.n_harmful,
        n_harmless=recipe.n_harmless,
        n_kl=recipe.n_kl,
        n_mc=recipe.n_mc,
        n_pairs=recipe.n_pairs,
        trim=recipe.trim,
        max_new_tokens=recipe.generation.max_new_tokens,
        batch_size=recipe.generation.batch_size,
        judge=recipe.refusal_judge,
    )
    sae = load_sae(recipe.sae_path) if recipe.sae_path else None

    def step(folder: Path) -> dict[str, Any]:
        return run_frontier_experiment(
            lm, folder, experiment, sae=sae, sae_path=recipe.sae_path, progress=progress
        )

    table = run.step("frontier", step)
    folder = run.step_dir("frontier")
    metrics = {"summary": {"model": recipe.model, "goal": recipe.goal, **summary(table)}, "frontier": table}
    finish_report(
        run,
        metrics,
        title=f"Refusal frontier on {recipe.model}",
        table=("Refusal frontier", frontier_table(table).columns),
        rows=frontier_table(table).rows,
        images=[p for p in (folder / "frontier_kl.png", folder / "frontier_over_refusal.png") if p.is_file()],
        extra_tables=[equal_cost_table(table["equal_over_refusal"]), equal_cost_table(table["equal_kl"])],
    )
    return metrics
