"""STA recipe: train (or load) an SAE, select target atoms, steer refusal, compare with CAA,
SAE-all-atoms and prompting on held-out harmful and harmless prompts, report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesteer.artifacts import load_intervention
from finesteer.data import load_dataset
from finesteer.fit.refusal_pairs import refusal_triples
from finesteer.fit.sta import answer_pairs, fit_sta
from finesteer.models import load_model
from finesteer.recipes.config import STARecipe
from finesteer.recipes.refusal import run_sta_refusal
from finesteer.recipes.run import RunFolder
from finesteer.recipes.summary import examples_step, finish_report
from finesteer.report.html import Table
from finesteer.sae.io import load_sae
from finesteer.sae.pipeline import train_on_model
from finesteer.sae.train import TrainConfig

COLUMNS = ("refusal_rate", "over_refusal_rate", "fluency")


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    recipe: STARecipe = run.recipe  # type: ignore[assignment]
    lm = load_model(recipe.model)
    run.pin(model_fingerprint=lm.fingerprint, model_info=lm.info.to_dict())

    def sae_step(folder: Path) -> dict[str, Any]:
        if recipe.sae_path:
            return {"sae_dir": recipe.sae_path, "trained": False}
        config = TrainConfig(d_sae=recipe.sae_width, k=recipe.sae_k, seed=recipe.seed)
        result = train_on_model(
            lm, recipe.layer, folder / "sae", tokens=recipe.sae_tokens, config=config,
            run_dir=folder / "work", resume=True, progress=progress,
        )  # fmt: skip
        return {**result.to_dict(), "trained": True}

    sae_info = run.step("sae", sae_step)
    sae = load_sae(sae_info["sae_dir"])

    def compare_step(folder: Path) -> dict[str, Any]:
        return run_sta_refusal(
            lm, sae, folder, methods=recipe.methods, multipliers=recipe.multipliers,
            headline=recipe.headline, trim=recipe.trim, n_pairs=recipe.n_pairs,
            n_harmful=recipe.n_harmful, n_harmless=recipe.n_harmless,
            sae_path=sae_info["sae_dir"], progress=progress,
        )  # fmt: skip

    results = run.step("compare", compare_step)
    methods = {name: {c: values.get(c) for c in COLUMNS} for name, values in results["methods"].items()}

    questions = [item.prompt for item in load_dataset("jailbreakbench", limit=recipe.examples)]
    steer = _headline_intervention(run, lm, sae, recipe, sae_info["sae_dir"])
    examples = run.step("examples", examples_step(run, lm, questions, steer))
    summary = {
        "model": recipe.model,
        "SAE": f"{sae.cfg.hook_name}, {sae.cfg.d_sae} latents, k={sae.cfg.k}",
        "headline multiplier": recipe.headline,
        **{f"refusal rate, {name}": values["refusal_rate"] for name, values in methods.items()},
        "at equal fluency": str(results.get("at_equal_fluency", {}).get("summary", "")),
    }
    rows = [[name, *(values[c] for c in COLUMNS)] for name, values in methods.items()]
    sweep_rows = [
        [name, float(mult), *(values.get(c) for c in COLUMNS)]
        for name, per in results.get("sweep", {}).items()
        for mult, values in per.items()
    ]

    metrics = {"summary": summary, "methods": methods, "sta": results}
    finish_report(
        run,
        metrics,
        title=f"Steering target atoms: refusal on {recipe.model}",
        table=(f"Headline (λ = {recipe.headline})", ["method", *COLUMNS]),
        rows=rows,
        examples=examples,
        extra_tables=[Table("Multiplier sweep", ["method", "λ", *COLUMNS], sweep_rows)],
    )
    return metrics


def _headline_intervention(run: RunFolder, lm: Any, sae: Any, recipe: STARecipe, sae_dir: str) -> Any:
    """The STA vector at the headline multiplier, saved as an artifact in the run folder."""
    folder = run.path / "artifacts" / "sta"
    if not (folder / "intervention.json").is_file():
        n_ab = max(0, recipe.n_pairs // 5)  # the same pairs run_sta_refusal fits on
        triples = refusal_triples(n_harmful=recipe.n_pairs - n_ab, n_ab=n_ab)
        fitted = fit_sta(
            lm, sae, answer_pairs(lm.tokenizer, triples), trim=recipe.trim, multiplier=recipe.headline,
            sae_path=sae_dir, progress=False,
        )  # fmt: skip
        fitted.save(folder, lm)
    return load_intervention(folder).intervention
