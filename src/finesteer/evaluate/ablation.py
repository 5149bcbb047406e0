"""Ablate located heads and measure attack success: the library side of `finesteer ablate`.

Two steps, so every input is checked before a model is loaded:

- `plan_ablation(setup)` resolves what to ablate and on which prompts: the ranked heads (given, or
  read from a run folder: its Sahara group, else its score ranking), the head counts k, the
  ablation mode and ε (defaults taken from the run's `run.json`), and the evaluation prompts minus
  the run's own attribution prompts;
- `run_ablation(lm, plan, out)` formats the prompts, loads the harmless and multiple-choice sets
  and runs `asr_effect` (top-k vs random heads vs the unmodified model), returning a summary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesteer.data import load_dataset
from finesteer.data.items import ABItem
from finesteer.data.typed import load_queries
from finesteer.errors import FinesteerError, check_count
from finesteer.evaluate.asr_effect import ASR_FILE, GENERATIONS_FILE, AsrSettings, asr_effect
from finesteer.interventions.edit import check_eps
from finesteer.locate import run_folder
from finesteer.locate.ships import DEFAULT_EPS, ablation_method, check_template, format_queries
from finesteer.models.info import ModelInfo
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, check_heads, parse_heads

log = logging.getLogger(__name__)

EVAL_KINDS: tuple[str, ...] = ("asr",)
DEFAULT_MAX_K = 5


class AblationError(FinesteerError, ValueError):
    """An ablation that cannot be set up as asked."""


@dataclass(frozen=True)
class AblationSetup:
    """What `finesteer ablate` was asked: the heads (`heads` "L.H,…" or `from_run`) and the evaluation."""

    data: str
    heads: str | None = None
    from_run: Path | None = None
    eval_kind: str = "asr"
    split: str | None = None
    limit: int | None = None
    ks: tuple[int, ...] | None = None
    mode: str | None = None
    eps: float | None = None
    random_seeds: int = 3
    max_new_tokens: int = 64
    harmless: str | None = "jailbreakbench-benign"
    harmless_limit: int | None = None
    helpfulness_ks: tuple[int, ...] | None = None
    mc: str = "finesteer-mc"
    template: str = "chat"
    batch_size: int = 8


@dataclass(frozen=True)
class AblationPlan:
    """The resolved ablation: heads best first, head counts, mode/ε and the evaluation prompts."""

    setup: AblationSetup
    heads: list[Head]
    ks: tuple[int, ...]
    mode: str
    eps: float
    queries: list[str]
    ids: list[str]
    excluded: int


def plan_ablation(setup: AblationSetup) -> AblationPlan:
    """Resolve `setup` without a model: heads, k values, mode/ε defaults and the prompts to evaluate on."""
    if setup.eval_kind not in EVAL_KINDS:
        raise AblationError(f"--eval {setup.eval_kind!r} is not supported; choose 'asr'")
    if (setup.heads is None) == (setup.from_run is None):
        raise AblationError("give exactly one of --heads or --from-run")
    run = setup.from_run
    run_info = run_folder.read_run(run) if run is not None else {}
    mode = setup.mode or run_info.get("mode") or "ua"
    eps = setup.eps if setup.eps is not None else float(run_info.get("eps") or DEFAULT_EPS)
    if run is not None:
        ranked = run_folder.run_heads(run, max(setup.ks or (DEFAULT_MAX_K,)))
    else:
        ranked = parse_heads(setup.heads or "")
    ks = setup.ks or tuple(range(1, min(DEFAULT_MAX_K, len(ranked)) + 1))
    queries, ids = load_queries(setup.data, setup.split, setup.limit)
    excluded = 0
    if run is not None:
        queries, ids, excluded = run_folder.exclude_run_prompts(run, queries, ids)
        if excluded:
            log.info("dropped %d evaluation prompts that were attribution prompts", excluded)
    return AblationPlan(setup, ranked, ks, mode, eps, queries, ids, excluded)


def _harmless_prompts(lm: LoadedModel, setup: AblationSetup) -> list[str] | None:
    if not setup.harmless or setup.harmless.lower() == "none":
        return None
    texts, _ = load_queries(setup.harmless, None, setup.harmless_limit or setup.limit)
    return format_queries(lm, texts, setup.template)


def check_plan(plan: AblationPlan, info: ModelInfo | None) -> None:
    """Every check of `plan` that needs only the model's shape (None: shape unknown, heads checked
    after the load): heads in range, ε finite and ≥ 0, the mode, counts ≥ 1, head counts within the
    ranking. Commands call it with `peek_model_info` before loading the model."""
    setup = plan.setup
    ablation_method(plan.mode)
    check_eps(plan.eps)
    check_count(setup.batch_size, "batch_size")
    check_count(setup.max_new_tokens, "max_new_tokens")
    check_count(setup.random_seeds, "random_seeds", minimum=0)
    check_template(setup.template)
    if info is not None:
        check_heads(plan.heads, info.n_layers, info.n_heads)
    largest = max((*plan.ks, *(setup.helpfulness_ks or ())), default=0)
    if not plan.ks or min(plan.ks) < 1 or largest > len(plan.heads):
        raise AblationError(f"head counts {list(plan.ks)} must be 1..{len(plan.heads)} (the heads given)")


def run_ablation(lm: LoadedModel, plan: AblationPlan, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Run the ASR evaluation of `plan` into `out` (asr.json, generations.jsonl); the summary payload."""
    check_plan(plan, lm.info)
    setup = plan.setup
    harmful = format_queries(lm, plan.queries, setup.template)
    harmless_prompts = _harmless_prompts(lm, setup)
    mc_items: list[ABItem] | None = None
    if harmless_prompts is not None and setup.mc.lower() != "none":
        mc_items = load_dataset(setup.mc)  # type: ignore[assignment]
    settings = AsrSettings(
        ks=plan.ks,
        mode=plan.mode,
        eps=plan.eps,
        random_seeds=tuple(range(setup.random_seeds)),
        helpfulness_ks=setup.helpfulness_ks,
        max_new_tokens=setup.max_new_tokens,
        batch_size=setup.batch_size,
    )
    log.info(
        "ASR on %d prompts of %s: baseline, top-k for k=%s, %d random sets per k (%s, ε=%s)",
        len(harmful),
        setup.data,
        list(plan.ks),
        setup.random_seeds,
        plan.mode,
        plan.eps,
    )
    result = asr_effect(
        lm,
        plan.heads,
        harmful,
        harmless_prompts=harmless_prompts,
        mc_items=mc_items,
        settings=settings,
        out=out,
        resume=resume,
        prompt_ids=plan.ids,
        metadata={
            "data": setup.data,
            "split": setup.split,
            "template": setup.template,
            "excluded_overlap": plan.excluded,
            "harmless_data": setup.harmless,
            "mc_data": setup.mc if mc_items else None,
            "from_run": str(setup.from_run or ""),
        },
    )
    return {
        "data": setup.data,
        "n_prompts": len(harmful),
        "excluded_overlap": plan.excluded,
        "heads": [f"{layer}.{head}" for layer, head in plan.heads],
        "mode": plan.mode,
        "eps": plan.eps,
        "baseline_asr": result["baseline"]["asr"],
        "ablated_asr": {k: v["asr"] for k, v in result["ablated"].items()},
        "random_asr_mean": {k: v["mean"] for k, v in result["random"].items()},
        "random_asr_std": {k: v["std"] for k, v in result["random"].items()},
        "effects": result["effects"],
        "verdict": {k: v["verdict"]["verdict"] for k, v in result["effects"].items()},
        "helpfulness": result.get("helpfulness"),
        "out": str(out),
        "asr_json": str(out / ASR_FILE),
        "generations": str(out / GENERATIONS_FILE),
    }
