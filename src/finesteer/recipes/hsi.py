"""HSI recipe: locate the heads that carry an A/B behaviour, steer them, measure, report.

Steps (each checkpointed in the run folder): baseline A/B rate on the test split → HSI fit
(directions, per-head α sweep, head + α selection; writes the sweep heatmap) → steered A/B rate →
optional baselines on the same data → open-ended generations before/after → report.

The test split is scored in both option orders, once, after the selection; the steered rate comes
with its paired effect, anti-steerable fraction and split by matching polarity. The selection's
verdict (validation only, against random-head controls, `finesteer.methods.verdict`) leads the
summary: "no reliable effect" is said plainly.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from finesteer.artifacts import load_intervention, save_intervention
from finesteer.data.balance import letter_balanced
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.evaluate.ab_paired import ab_effect_vs
from finesteer.evaluate.eval_sets import load_eval_sets, score_eval_sets
from finesteer.fit.controls import controls_for
from finesteer.fit.hsi import HSIConfig, fit_hsi_selection
from finesteer.fit.hsi_directions import cached_directions
from finesteer.methods import fit_method, load_behaviour_data
from finesteer.methods.verdict import attach_verdict
from finesteer.models import load_model
from finesteer.recipes.config import HSIRecipe
from finesteer.recipes.run import RunFolder
from finesteer.recipes.summary import AB_COLUMNS, ab_row, examples_step, finish_report
from finesteer.report.html import Table
from finesteer.report.sweep import plot_sweep_folder
from finesteer.scoring.ab import ABPrompt

log = logging.getLogger(__name__)


def _heads_subset(recipe: HSIRecipe, n_heads: int) -> list[tuple[int, int]] | None:
    heads = recipe.head_fields().get("heads")
    if heads:
        return heads
    if recipe.layers:
        return [(layer, h) for layer in recipe.layers for h in range(n_heads)]
    return None


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    recipe: HSIRecipe = run.recipe  # type: ignore[assignment]
    data = load_behaviour_data(
        recipe.behaviour,
        train_limit=recipe.train_limit,
        val_limit=recipe.val_limit,
        test_limit=recipe.test_limit,
        open_ended_limit=recipe.open_ended_limit,
        seed=recipe.seed,
    )
    run.pin(data_hashes=data.summary())
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    run.pin(model_fingerprint=lm.fingerprint, model_info=lm.info.to_dict())

    test_items = letter_balanced(data.test_ab, strict=False)  # both option orders

    def ab(intervention: Any = None, system: str | None = None) -> dict[str, Any]:
        result = ab_matching_rate_prob(
            lm, test_items, intervention=intervention, prompt=ABPrompt(system), progress=progress
        )
        return result.to_dict(per_item=True)

    def steered_step(intervention: Any) -> dict[str, Any]:
        base = ab_matching_rate_prob(lm, test_items, progress=progress)
        steered = ab_matching_rate_prob(lm, test_items, intervention=intervention, progress=progress)
        return {**steered.to_dict(per_item=True), "effect": ab_effect_vs(base, steered).to_dict()}

    baseline = run.step("baseline", lambda folder: ab())
    artifact_dir = run.path / "artifacts" / "hsi"

    def fit(folder: Path) -> dict[str, Any]:
        subset = _heads_subset(recipe, lm.info.n_heads)
        config = HSIConfig(
            k=recipe.k,
            alphas=tuple(recipe.alphas),
            heads_subset=tuple(subset) if subset is not None else None,
            n_sweep=recipe.sweep_limit,
            seed=recipe.seed,
            directions_from=recipe.directions_from,
            n_samples=recipe.n_samples,
        )
        fitted, selection = fit_hsi_selection(
            lm, data.train, data.val, config, run_dir=folder, progress=progress
        )
        attach_verdict(fitted.metadata, selection.evidence, "HSI selection")
        plot_sweep_folder(folder, rank_by=config.rank_by, top=config.k)
        fitted.save(artifact_dir, lm)
        return fitted.metadata

    fitted = run.step("locate_and_fit", fit)
    steer = load_intervention(artifact_dir).intervention
    steered = run.step("steered", lambda folder: steered_step(steer))
    methods = {"baseline": ab_row(baseline), "hsi": ab_row(steered)}
    if recipe.controls:

        def control(folder: Path) -> dict[str, Any]:
            """As many random heads, steered at the same α in units of their own σ (every head's
            direction fitted on the train split, as `compare` does), one A/B run per seed."""
            directions = cached_directions(lm, data.train, folder, progress=progress)
            info, seeds = lm.info, range(recipe.controls)
            built = controls_for(steer, info.n_layers, info.n_heads, seeds, directions=directions)
            return {
                "kind": built[0].kind,
                "seeds": {
                    str(c.seed): {"heads": [f"{a}.{b}" for a, b in c.heads], **ab(c.intervention)}
                    for c in built
                },
            }

        run.step("controls", control)
    for name in recipe.baselines:

        def other(folder: Path, name: str = name) -> dict[str, Any]:
            setup = fit_method(name, lm, data, {"progress": progress} if name != "prompt" else {}, folder)
            if setup.intervention is not None:
                save_intervention(
                    run.path / "artifacts" / name, setup.intervention, lm, metadata=setup.metadata
                )
            return {**ab(setup.intervention, setup.system_prompt), "metadata": setup.metadata}

        methods[name] = ab_row(run.step(f"baseline_{name}", other))

    eval_rows: list[dict[str, Any]] = []
    if recipe.eval_data:
        eval_rows = run.step("eval_sets", lambda f: _eval_sets(recipe, lm, steer, baseline, steered))["rows"]
    questions = [item.question for item in data.open_ended]
    examples = run.step("examples", examples_step(run, lm, questions, steer))
    heads = ", ".join(f"{layer}.{head}" for layer, head in fitted["heads"])
    summary = {
        "verdict": fitted.get("verdict"),
        "behaviour": recipe.behaviour,
        "model": recipe.model,
        "heads (layer.head)": heads,
        "alpha (units of sigma)": fitted["alpha"],
        "A/B matching rate, unmodified": baseline["matching_rate"],
        "A/B matching rate, HSI": steered["matching_rate"],
        "change": round(steered["matching_rate"] - baseline["matching_rate"], 4),
        "test items": baseline["n"],
        "test in both option orders": True,
    }
    metrics = {"verdict": fitted.get("verdict"), "summary": summary, "methods": methods, "hsi": fitted}
    if eval_rows:
        metrics["eval_sets"] = eval_rows
    images = sorted((run.path / "steps" / "locate_and_fit").glob("*.png"))
    finish_report(
        run,
        metrics,
        title=f"HSI: {recipe.behaviour} on {recipe.model}",
        table=("A/B matching rate on the test split", ["method", *AB_COLUMNS]),
        rows=[[name, *(values[c] for c in AB_COLUMNS)] for name, values in methods.items()],
        images=images,
        examples=examples,
        extra_tables=[
            Table("A/B matching rate per test set", list(eval_rows[0]), [list(r.values()) for r in eval_rows])
        ]
        if eval_rows
        else [],
    )
    return metrics


def _eval_sets(
    recipe: HSIRecipe, lm: Any, steer: Any, baseline: dict[str, Any], steered: dict[str, Any]
) -> dict[str, Any]:
    """One row per test set (the behaviour's test split, then each `eval_data` file): the matching rate
    by letter probability unmodified and with HSI, every set in both option orders like the test split."""
    sets = [
        dataclasses.replace(s, items=tuple(letter_balanced(s.items, strict=False)))
        for s in load_eval_sets(recipe.eval_data)
    ]
    before = score_eval_sets(lm, sets, None, method="prob", progress=False)
    after = score_eval_sets(lm, sets, steer, method="prob", progress=False)
    rows = [
        {"test set": f"{recipe.behaviour} (test split)", "n": baseline["n"],
         "baseline": baseline["matching_rate"], "hsi": steered["matching_rate"]}
    ]  # fmt: skip
    for b, a in zip(before, after, strict=True):
        rows.append({"test set": b["name"], "n": b["n"], "baseline": b["matching_rate_prob"],
                     "hsi": a["matching_rate_prob"]})  # fmt: skip
    return {"rows": rows}
