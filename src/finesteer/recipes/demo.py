"""The built-in demo tours (`finesteer demo`): which recipe each runs, and the HSI tour's verdict.

* `refusal` (default): `demo.yaml`, the refusal-heads recipe (located vs random heads, ASR with
  intervals, a control row and a verdict; `finesteer.recipes.refusal_heads`).
* `hsi`: `demo_hsi.yaml`, the former demo (HSI on coordinate-other-ais, SmolLM2). Its verdict is on
  the paired change of the test split's matching rate, HSI − random heads at the same α (3 seeds,
  `ab_effect_vs_controls`), next to HSI vs unmodified (`ab_effect_vs`), both Holm-adjusted; added to
  the run's metrics by `tour_verdict`.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import yaml

from finesteer.evaluate.ab import ABResult
from finesteer.evaluate.ab_paired import ab_effect_vs, ab_effect_vs_controls
from finesteer.evaluate.answer_bias import answer_bias, verdict_caveats
from finesteer.evaluate.effect_verdict import effect_verdict
from finesteer.evaluate.stats import holm, seed_spread
from finesteer.recipes.config import AnyRecipe, RecipeError, parse_recipe
from finesteer.recipes.run import RunFolder
from finesteer.runs import METRICS_JSON, write_json_atomic

TOURS = {"refusal": "demo.yaml", "hsi": "demo_hsi.yaml"}


def tour_recipe(tour: str, model: str | None = None) -> AnyRecipe:
    """The recipe of a demo tour, on `model` when given (else the tour's own model)."""
    if tour not in TOURS:
        raise RecipeError(f"unknown demo tour {tour!r}; choose one of {', '.join(TOURS)}")
    data = yaml.safe_load(resources.files("finesteer.recipes").joinpath(TOURS[tour]).read_text())
    if model is not None:
        data["model"] = model
    return parse_recipe(data)


def _ab(result: dict[str, Any]) -> ABResult:
    if "per_item" not in result:
        raise RecipeError("this run's A/B steps kept no per-item scores; rerun the tour to get its verdict")
    return ABResult(
        n=result["n"],
        matching_rate=result["matching_rate"],
        count=result["count"],
        mean_p_matching=result["mean_p_matching"],
        per_item=result["per_item"],
        n_undefined=result.get("n_undefined", 0),
        method=result.get("method", "prob"),
    )


def _fmt(entry: dict[str, Any], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    value = entry.get("difference", entry.get("value"))
    return f"{f.format(value)} [{f.format(entry['low'])}, {f.format(entry['high'])}]"


def _control_rows(vs_control: dict[str, Any], controls: dict[str, Any], p_value: float) -> list[list[str]]:
    """The control row (each seed's matching rate, mean ± sd) and the headline row HSI − random heads."""
    rates = [float(c["matching_rate"]) for c in controls.values()]
    spread, k = seed_spread(rates), len(next(iter(controls.values()))["heads"])
    std = spread["std"] if spread["std"] is not None else 0.0
    return [
        [f"control: {k} random heads, {len(rates)} seeds (mean ± sd)", "same α in σ units",
         f"{spread['mean']:.3f} ± {std:.3f}", "–", "–"],
        ["effect: HSI − random", "–", "–", _fmt(vs_control["matching"], signed=True),
         f"{p_value:.2g} ({vs_control['matching']['test']}, Holm)"],
    ]  # fmt: skip


def tour_verdict(run: RunFolder, metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with the verdict of a finished HSI tour, written to metrics.json too: steered vs
    unmodified matching rate on the test split (heads and α were chosen on train/validation, so the
    test is scored once) and, when the run has random-head controls, the headline HSI − random heads
    (per-item mean over seeds), both p-values Holm-adjusted. Other recipes carry their own verdict and
    are returned unchanged. The fit's own verdict on its validation choice is kept as
    `selection_verdict`; the tour's verdict is the one on the test split."""
    if "table" in metrics or run.recipe.method != "hsi":  # type: ignore[attr-defined]
        return metrics
    if metrics.get("verdict") is not None:
        metrics = {**metrics, "selection_verdict": metrics["verdict"]}
    steered = _ab(run.result("steered"))
    comparison = ab_effect_vs(_ab(run.result("baseline")), steered)
    change = comparison.matching.to_dict()
    controls = run.result("controls")["seeds"] if run.done("controls") else {}
    added: dict[str, Any] = {"effect": comparison.to_dict()}
    rows = [
        ["unmodified", "–", _fmt(change["reference"]), "–", "–"],
        [
            "HSI",
            metrics["summary"].get("heads (layer.head)", ""),
            _fmt(change["treated"]),
            _fmt(change, signed=True),
            f"{change['p_value']:.2g} ({change['test']})",
        ],
    ]
    if controls:
        vs_control = ab_effect_vs_controls([_ab(c) for c in controls.values()], steered)
        adjusted = holm([comparison.matching.p_value, vs_control.matching.p_value])
        verdict = effect_verdict(vs_control.matching, adjusted_p=adjusted[1]).to_dict()
        added["effect_vs_control"] = vs_control.to_dict()
        added["holm_p"] = {"vs_unmodified": adjusted[0], "vs_control": adjusted[1]}
        rows += _control_rows(added["effect_vs_control"], controls, adjusted[1])
        line = (
            f"verdict: {verdict['verdict']} — HSI changes the A/B matching rate by "
            f"{_fmt(added['effect_vs_control']['matching'], signed=True)} (95% CI) beyond as many random "
            f"heads at the same α ({len(controls)} seeds), Holm-adjusted p = {adjusted[1]:.2g}; "
            f"n = {change['n']} test items"
        )
    else:
        verdict = effect_verdict(comparison.matching).to_dict()
        line = (
            f"verdict: {verdict['verdict']} — HSI changes the A/B matching rate by "
            f"{_fmt(change, signed=True)} (95% CI) on n = {change['n']} test items (no random-head control "
            "in this run)"
        )
    if verdict["reasons"]:
        line += f" ({'; '.join(verdict['reasons'])})"
    added["answer_bias"] = answer_bias(comparison)
    verdict["caveats"] = verdict_caveats(added["answer_bias"], verdict["verdict"])
    line += "".join(f" ⚠ {caveat}" for caveat in verdict["caveats"])
    table = {
        "title": "A/B matching rate on the test split",
        "columns": ["condition", "heads", "matching rate [95% CI]", "change [95% CI]", "p"],
        "rows": rows,
        "verdict_line": line,
    }
    added.update(verdict=verdict["verdict"], verdict_line=line, table=table)
    stored = run.path / METRICS_JSON
    write_json_atomic(stored, {**added, **(json.loads(stored.read_text()) if stored.is_file() else metrics)})
    return {**added, **metrics}
