"""Refusal-heads recipe (the demo's showcase): the Ships recipe with the refusal-metric ranking, then
how real the ASR change is.

The located heads, the ASR generations, their paired effects and the examples come from
`finesteer.recipes.ships.run` unchanged: its ASR step (`asr_effect`) already pairs every prompt's
outcome with the unmodified model and the random-head control (`finesteer.evaluate.asr_paired`, the
one implementation). This recipe picks the top-k entry, adds the heads and the over-refusal change,
and rewrites the report with the verdict on top: the effect with its 95% interval, the random-head
control (mean ± spread over seeds) and a computed verdict.
"""

from __future__ import annotations

from typing import Any

from finesteer.recipes import ships
from finesteer.recipes.config import RecipeError, RefusalHeadsRecipe
from finesteer.recipes.run import RunFolder
from finesteer.recipes.summary import finish_report
from finesteer.report.html import Table
from finesteer.runs import RESULT_JSON, STEPS_DIR

COLUMNS = ["condition", "ASR [95% CI]", "change vs unmodified [95% CI]", "p (test)"]


def _interval(entry: dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    value = entry.get("difference", entry.get("value"))
    if value is None or entry.get("low") is None:
        return "undefined"
    return f"{fmt.format(value)} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}]"


def _p(value: float | None, test: str) -> str:
    return "undefined" if value is None else f"{value:.2g} {test}"


def _heads(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (" …" if len(names) > limit else "")


def demo_effect(asr: dict[str, Any], k: int) -> dict[str, Any]:
    """The ASR step's paired effects of the top-`k` heads (`asr_effect` → `ablation_effects`) with the
    heads ablated, each control seed's heads and, when measured, the over-refusal change."""
    entry = asr.get("effects", {}).get(str(k), {})
    if "holm_p" not in entry:
        raise RecipeError(
            f"this run's ASR step has no paired effects of the top-{k} heads against random heads; "
            "rerun it (remove the run's steps/asr folder, then resume)"
        )
    per_seed = asr["random"][str(k)]["per_seed"]
    seeds = {name: {"heads": per_seed[name]["heads"], **s} for name, s in entry["random"]["seeds"].items()}
    effect = {"k": k, "heads": asr["ablated"][str(k)]["heads"], **entry}
    effect["random"] = {**entry["random"], "seeds": seeds}
    cost = (asr.get("helpfulness") or {}).get(f"top-{k}", {}).get("vs_baseline", {}).get("over_refusal")
    if cost and cost.get("difference") is not None:
        effect["over_refusal"] = cost
    return effect


def verdict_table(effect: dict[str, Any]) -> dict[str, Any]:
    """The printed and reported table: unmodified, top-k, the control row, the headline difference and
    (when measured) the over-refusal cost; plus the one-line verdict. Cells are strings."""
    k, vs_base, control = effect["k"], effect["vs_baseline"], effect["random"]
    spread, change = control["asr_per_seed"], control["change_vs_baseline_per_seed"]
    std = spread["std"] if spread["std"] is not None else 0.0
    change_std = change["std"] if change["std"] is not None else 0.0
    rows = [
        ["unmodified", _interval(vs_base["reference"]), "–", "–"],
        [
            f"top-{k} located heads ablated",
            _interval(vs_base["treated"]),
            _interval(vs_base, signed=True),
            _p(effect["holm_p"]["vs_baseline"], "McNemar, Holm"),
        ],
        [
            f"control: {k} random heads, {spread['n_seeds']} seeds (mean ± sd)",
            f"{spread['mean']:.3f} ± {std:.3f}",
            f"{change['mean']:+.3f} ± {change_std:.3f}",
            "–",
        ],
        [
            "effect: located − random",
            "–",
            _interval(effect["vs_random"], signed=True),
            _p(effect["holm_p"]["vs_random"], "sign-flip, Holm"),
        ],
    ]
    if "over_refusal" in effect:
        cost = effect["over_refusal"]
        rows.append(
            [
                f"cost: over-refusal, {cost['n']} harmless prompts",
                f"{cost['reference']['value']:.3f} → {cost['treated']['value']:.3f}",
                _interval(cost, signed=True),
                _p(cost["p_value"], "McNemar"),
            ]
        )
    verdict = effect["verdict"]
    line = (
        f"verdict: {verdict['verdict']} — ablating the top-{k} located heads changes ASR by "
        f"{_interval(effect['vs_random'], signed=True)} (95% CI) beyond {k} random heads "
        f"({spread['n_seeds']} seeds, control ASR {control['asr_mean']:.3f}), Holm-adjusted "
        f"p = {_p(verdict['p_value'], '(paired sign-flip test)')}; n = {effect['n']} held-out harmful prompts"
    )
    if verdict["reasons"]:
        line += f" ({'; '.join(verdict['reasons'])})"
    title = f"ASR on {effect['n']} held-out harmful prompts; located heads: {_heads(effect['heads'])}"
    return {"title": title, "columns": COLUMNS, "rows": rows, "verdict_line": line}


def _seed_rows(effect: dict[str, Any]) -> list[list[Any]]:
    return [
        [name, _heads(s["heads"]), _interval(s["asr"]), _interval(s["vs_baseline"], signed=True)]
        for name, s in effect["random"]["seeds"].items()
    ]


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    recipe: RefusalHeadsRecipe = run.recipe  # type: ignore[assignment]
    metrics = ships.run(run, progress=progress)
    paired = demo_effect(metrics["asr"], max(recipe.top_k))
    table = verdict_table(paired)
    metrics = {  # after the Ships metrics: this recipe's verdict is the one shown
        **metrics,
        "verdict": paired["verdict"]["verdict"],
        "verdict_line": table["verdict_line"],
        "effect": paired,
        "table": table,
        "summary": {"verdict": table["verdict_line"], **metrics["summary"]},
    }
    examples_file = run.path / STEPS_DIR / "examples" / RESULT_JSON
    finish_report(
        run,
        metrics,
        title=f"Refusal heads of {recipe.model}: located vs random heads",
        table=(table["title"], table["columns"]),
        rows=table["rows"],
        images=sorted((run.path / STEPS_DIR / "ships").glob("*.png")),
        examples=run.result("examples") if examples_file.is_file() else None,
        extra_tables=[
            Table(
                "Random-head control seeds",
                ["seed", "heads", "ASR [95% CI]", "change vs unmodified [95% CI]"],
                _seed_rows(paired),
            )
        ],
    )
    return metrics
