"""Refusal-heads recipe (the demo's showcase): the Ships recipe with the refusal-metric ranking, then
how real the ASR change is.

The located heads, the ASR generations and the examples come from `finesteer.recipes.ships.run`
unchanged; this recipe adds one step, `verdict`, that pairs the judged generations by prompt
(`finesteer.evaluate.asr_paired`) and rewrites the report with the verdict on top: the effect with
its 95% interval, the random-head control (mean ± spread over seeds) and a computed verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesteer.evaluate.asr_effect import GENERATIONS_FILE
from finesteer.evaluate.asr_paired_records import asr_paired_effects, read_generations
from finesteer.recipes import ships
from finesteer.recipes.config import RefusalHeadsRecipe
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


def verdict_table(paired: dict[str, Any]) -> dict[str, Any]:
    """The printed and reported table: unmodified, top-k, the control row, the headline difference and
    (when measured) the over-refusal cost; plus the one-line verdict. Cells are strings."""
    k, top = paired["k"], f"top-{paired['k']}"
    control, spread = paired["control"], paired["control"]["asr_per_seed"]
    change = paired["control"]["change_vs_unmodified_per_seed"]
    std = spread["std"] if spread["std"] is not None else 0.0
    change_std = change["std"] if change["std"] is not None else 0.0
    rows = [
        ["unmodified", _interval(paired["asr"]["unmodified"]), "–", "–"],
        [
            f"top-{k} located heads ablated",
            _interval(paired["asr"][top]),
            _interval(paired["vs_unmodified"], signed=True),
            _p(paired["holm_p"]["vs_unmodified"], "McNemar, Holm"),
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
            _interval(paired["vs_control"], signed=True),
            _p(paired["holm_p"]["vs_control"], "sign-flip, Holm"),
        ],
    ]
    if "over_refusal" in paired:
        cost = paired["over_refusal"]
        rows.append(
            [
                f"cost: over-refusal, {cost['change']['n']} harmless prompts",
                f"{cost['unmodified']['value']:.3f} → {cost[top]['value']:.3f}",
                _interval(cost["change"], signed=True),
                _p(cost["change"]["p_value"], "McNemar"),
            ]
        )
    verdict = paired["verdict"]
    line = (
        f"verdict: {verdict['verdict']} — ablating the top-{k} located heads changes ASR by "
        f"{_interval(paired['vs_control'], signed=True)} (95% CI) beyond {k} random heads "
        f"({spread['n_seeds']} seeds, control ASR {control['asr_mean']:.3f}), Holm-adjusted "
        f"p = {_p(verdict['p_value'], '(paired sign-flip test)')}; n = {paired['n']} held-out harmful prompts"
    )
    if verdict["reasons"]:
        line += f" ({'; '.join(verdict['reasons'])})"
    title = f"ASR on {paired['n']} held-out harmful prompts; located heads: {_heads(paired['heads'])}"
    return {"title": title, "columns": COLUMNS, "rows": rows, "verdict_line": line}


def _seed_rows(paired: dict[str, Any]) -> list[list[Any]]:
    return [
        [name, _heads(s["heads"]), _interval(s["asr"]), _interval(s["change_vs_unmodified"], signed=True)]
        for name, s in paired["control"]["seeds"].items()
    ]


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    recipe: RefusalHeadsRecipe = run.recipe  # type: ignore[assignment]
    metrics = ships.run(run, progress=progress)
    k = max(recipe.top_k)

    def measure(folder: Path) -> dict[str, Any]:
        records = read_generations(run.path / STEPS_DIR / "asr" / GENERATIONS_FILE)
        return asr_paired_effects(records, k, seed=recipe.seed)

    paired = run.step("verdict", measure)
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
