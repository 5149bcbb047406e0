"""Attack success rate and refusal rate of a model on harmful prompts (`finesteer eval asr`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finesteer.data.items import Item
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.asr_plan import run_generation_plan
from finesteer.evaluate.harness import run_generations
from finesteer.evaluate.judges import HARMFULNESS, KeywordRefusalJudge, LLMJudge
from finesteer.evaluate.scores import attack_success_rate, refusal_rate
from finesteer.evaluate.stats import rate_estimate
from finesteer.evaluate.verdict import Judge
from finesteer.generation import GenerationConfig
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.runs.backend import Backend
from finesteer.runs.records import JsonlRecords

ASR_JUDGES: tuple[str, ...] = ("keyword", "gcg", "llm")
JOBS_FILE = "generation_jobs.jsonl"


def asr_judges(judge: str) -> dict[str, Judge]:
    """The judges of `judge`: a keyword refusal judge (Ships list, or GCG prefixes) and for 'llm' the
    harmfulness rubric on an OpenAI-compatible endpoint."""
    keyword = KeywordRefusalJudge.gcg() if judge == "gcg" else KeywordRefusalJudge.ships()
    judges: dict[str, Judge] = {"keyword": keyword}
    if judge == "llm":
        judges["llm"] = LLMJudge(HARMFULNESS)
    return judges


def asr_rates(
    lm: LoadedModel,
    items: Sequence[Item],
    judges: dict[str, Judge],
    *,
    intervention: Intervention | None = None,
    out_path: Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Generate (chat template, greedy), judge, and rate: ASR by the llm judge if given, else keyword.

    With `out_path` the generations are streamed to that JSONL file and a rerun resumes. With
    `backend` the batches run as plan jobs on it (`finesteer.evaluate.asr_plan`; local or Ray actors),
    stored beside `out_path` in `generation_jobs.jsonl`.
    """
    if backend is not None:
        store = JsonlRecords(out_path.with_name(JOBS_FILE)) if out_path is not None else None
        config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
        rows = run_generation_plan(
            lm, items, {"asr": intervention}, judges,
            format_fn=lambda text: chat_prompt(lm.tokenizer, text, system), config=config,
            backend=backend, store=store, progress=progress,
        )["asr"]  # fmt: skip
        return _rates(rows, judges)
    rows = run_generations(
        lm,
        items,
        out_path,
        format_fn=lambda text: chat_prompt(lm.tokenizer, text, system),
        config=GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
        intervention=intervention,
        judges=judges,
        progress=progress,
    )
    return _rates(rows, judges)


def _rates(rows: list[dict[str, Any]], judges: dict[str, Judge]) -> dict[str, Any]:
    asr_key = "llm" if "llm" in judges else "keyword"
    success = attack_success_rate(row["verdicts"][asr_key]["score"] for row in rows)
    refusals = refusal_rate(row["verdicts"]["keyword"]["label"] == "refusal" for row in rows)
    return {
        "n": len(rows),
        "asr": success.rate,
        "asr_count": success.count,
        "asr_ci95": list(success.interval()),
        "asr_n_missing": success.n_missing,
        "refusal_rate": refusals.rate,
        "refusal_count": refusals.count,
        "refusal_ci95": list(refusals.interval()),
        "asr_interval": rate_estimate(success.count, success.n).to_dict(),
        "refusal_interval": rate_estimate(refusals.count, refusals.n).to_dict(),
        "records": rows,
    }
