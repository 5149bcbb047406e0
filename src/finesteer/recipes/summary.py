"""Pieces every recipe shares: before/after example generations and writing metrics + report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesteer.data.prompts import chat_prompt
from finesteer.generation import GenerationConfig, generate
from finesteer.recipes.run import RunFolder
from finesteer.report.html import Example, ReportContent, Table, render_html

AB_COLUMNS = ("matching_rate", "mean_p_matching", "n")


def ab_row(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an ABResult dict, as stored in metrics.json's `methods`."""
    return {key: result.get(key) for key in AB_COLUMNS}


def examples_step(
    run: RunFolder, lm: Any, questions: Sequence[str], intervention: Any, system: str | None = None
) -> Callable[[Path], dict[str, Any]]:
    """A step that generates replies to `questions` without and with the intervention (greedy)."""
    recipe = run.recipe
    questions = list(questions)[: recipe.examples]

    def step(folder: Path) -> dict[str, Any]:
        if not questions:
            return {"examples": []}
        prompts = [chat_prompt(lm.tokenizer, q, system=system) for q in questions]
        config = GenerationConfig(
            max_new_tokens=recipe.generation.max_new_tokens,
            batch_size=recipe.generation.batch_size,
            do_sample=recipe.generation.do_sample,
            temperature=recipe.generation.temperature,
            seed=recipe.seed,
        )
        before = generate(lm, prompts, config)
        after = generate(lm, prompts, config, intervention=intervention)
        rows = [
            {"prompt": q, "before": b, "after": a} for q, b, a in zip(questions, before, after, strict=True)
        ]
        return {"examples": rows}

    return step


def finish_report(
    run: RunFolder,
    metrics: dict[str, Any],
    *,
    title: str,
    table: tuple[str, list[str]],
    rows: list[list[Any]],
    images: Sequence[Path] = (),
    examples: dict[str, Any] | None = None,
    extra_tables: Sequence[Any] = (),
    verdicts: Sequence[tuple[str, str, str]] = (),
) -> Path:
    """Write metrics.json and report.html, mark the run finished; returns the report path.

    `verdicts` (row, label, why) are shown first, above the summary (`finesteer.evaluate.effect_verdict`)."""
    state = run.state
    content = ReportContent(
        title=title,
        subtitle=f"run {run.path.name} · model fingerprint {str(state.get('model_fingerprint', ''))[:16]}",
        summary=metrics.get("summary", {}),
        tables=[Table(table[0], table[1], rows), *extra_tables],
        verdicts=list(verdicts),
        images=[(p.stem.replace("_", " "), p) for p in images],
        examples=[
            Example(e["prompt"], e["before"], e["after"]) for e in (examples or {}).get("examples", [])
        ],
        commands=[state.get("command", ""), state.get("resume_command", "")],
        environment={
            "python": state["environment"]["python"],
            **{k: v for k, v in state["environment"]["packages"].items() if v},
            "step seconds": ", ".join(f"{k} {v['seconds']}" for k, v in run.state["steps"].items()),
        },
    )
    report = render_html(content, run.path / "report.html")
    run.finish({**metrics, "report": str(report)})
    return report
