"""Ships/Sahara recipe: score every head by ablation on harmful prompts, optionally grow a Sahara
group, then measure how ablating the top heads moves the attack success rate against random heads.

Attribution and evaluation prompts come from different datasets (or are de-duplicated), so the
ASR effect is measured on prompts the heads were not chosen on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finesteer.data import load_dataset
from finesteer.evaluate.asr_effect import AsrSettings, asr_effect
from finesteer.evaluate.asr_paired import verdict_label
from finesteer.locate.attribution.metrics import TokenLogProb, refusal_token_ids
from finesteer.locate.attribution.prerank import pre_ranked_scan
from finesteer.locate.sahara import sahara
from finesteer.locate.ships import ablation, format_queries, ships_scores
from finesteer.models import load_model
from finesteer.recipes.config import RecipeError, ShipsRecipe
from finesteer.recipes.run import RunFolder, data_hash
from finesteer.recipes.summary import examples_step, finish_report
from finesteer.report.certificate import bound_table
from finesteer.report.forest import Rate, plot_rates
from finesteer.report.heatmap import plot_head_heatmap

log = logging.getLogger(__name__)


def _texts(name: str, split: str | None, limit: int) -> list[str]:
    items = load_dataset(name, split=split, limit=limit)
    return [getattr(item, "prompt", None) or item.question for item in items]


def _refusal_ranking(lm: Any, prompts: list[str], recipe: ShipsRecipe, folder: Path) -> dict[str, Any]:
    """Heads ranked by how much ablating them lowers log p(refusal opening tokens): a gradient
    estimate for every head, the best `verify_top` verified exactly (`pre_ranked_scan`)."""
    metric = TokenLogProb(refusal_token_ids(lm.tokenizer))
    top_n = min(recipe.verify_top, lm.info.n_layers * lm.info.n_heads)
    result = pre_ranked_scan(lm, prompts, metric, mode=recipe.mode, eps=recipe.eps, top_n=top_n)
    result.estimate.save(folder / "estimate")
    result.scores.save(folder / "scores")
    plot_head_heatmap(result.scores, folder / "ships_heatmap.png", title=f"refusal drop ({recipe.mode})")
    exact = dict(zip(result.verified, result.exact.mean(1).tolist(), strict=True))
    count = max(10, recipe.sahara_candidates or 0)
    assert result.bound is not None
    log.warning("pre-ranked head scan: %s", result.bound.line())
    return {
        "top": [[lay, h, exact.get((lay, h))] for lay, h in result.ranking()[:count]],
        "metric": metric.key(),
        "agreement": result.agreement,
        "bound": result.bound.to_dict(),
    }


def _ships_ranking(
    lm: Any, prompts: list[str], recipe: ShipsRecipe, folder: Path, progress: bool
) -> dict[str, Any]:
    """Heads ranked by their Ships score at `recipe.level` (one ablation scan, checkpointed)."""
    scores = ships_scores(
        lm,
        prompts,
        levels=(recipe.level,),
        mode=recipe.mode,
        eps=recipe.eps,
        checkpoint=folder / "scan",
        progress=progress,
    )[recipe.level]
    scores.save(folder / "scores")
    plot_head_heatmap(scores, folder / "ships_heatmap.png", title=f"Ships ({recipe.level}, {recipe.mode})")
    top = scores.top(max(10, recipe.sahara_candidates or 0))
    return {"top": [[layer, head, score] for layer, head, score in top]}


def _sahara_group(
    lm: Any, prompts: list[str], recipe: ShipsRecipe, ranking: list[Any], folder: Path, progress: bool
) -> dict[str, Any]:
    """A Sahara group grown from the ranking's top candidates (or the recipe's heads)."""
    result = sahara(
        lm,
        prompts,
        group_size=recipe.sahara_group_size,
        mode=recipe.mode,
        eps=recipe.eps,
        candidates=(
            ranking[: recipe.sahara_candidates]
            if recipe.sahara_candidates
            else recipe.head_fields().get("heads")
        ),
        checkpoint=folder / "checkpoint",
        progress=progress,
    )
    return result.to_dict()


def _asr_settings(recipe: ShipsRecipe) -> AsrSettings:
    return AsrSettings(
        ks=tuple(recipe.top_k),
        mode=recipe.mode,
        eps=recipe.eps,
        random_seeds=tuple(range(recipe.random_seeds)),
        max_new_tokens=recipe.generation.max_new_tokens,
        batch_size=recipe.generation.batch_size,
        helpfulness_ks=(max(recipe.top_k),),
        seed=recipe.seed,
    )


def run(run: RunFolder, *, progress: bool = True) -> dict[str, Any]:
    recipe: ShipsRecipe = run.recipe  # type: ignore[assignment]
    attribution = _texts(recipe.attribution_data, recipe.attribution_split, recipe.attribution_limit)
    seen = {q.strip().lower() for q in attribution}
    evaluation = [
        q
        for q in _texts(recipe.evaluation_data, None, recipe.evaluation_limit)
        if q.strip().lower() not in seen
    ]
    if not evaluation:
        raise RecipeError("every evaluation prompt is also an attribution prompt; choose other data")
    run.pin(data_hashes={"attribution": data_hash(attribution), "evaluation": data_hash(evaluation)})
    lm = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    run.pin(model_fingerprint=lm.fingerprint, model_info=lm.info.to_dict())
    attr_prompts = format_queries(lm, attribution)
    eval_prompts = format_queries(lm, evaluation)
    harmless_prompts = mc_items = None
    if recipe.harmless_data:
        harmless_prompts = format_queries(lm, _texts(recipe.harmless_data, None, recipe.harmless_limit))
        if recipe.mc_data:
            mc_items = load_dataset(recipe.mc_data)

    def locate(folder: Path) -> dict[str, Any]:
        if recipe.score == "refusal":
            return _refusal_ranking(lm, attr_prompts, recipe, folder)
        return _ships_ranking(lm, attr_prompts, recipe, folder, progress)

    located = run.step("ships", locate)
    ranking = [(layer, head) for layer, head, _ in located["top"]]
    if recipe.sahara_group_size:

        def grow(folder: Path) -> dict[str, Any]:
            return _sahara_group(lm, attr_prompts, recipe, ranking, folder, progress)

        group = [tuple(h) for h in run.step("sahara", grow)["group"]]
        ranking = [*group, *(h for h in ranking if h not in group)]

    def measure(folder: Path) -> dict[str, Any]:
        return asr_effect(
            lm,
            ranking[: max(recipe.top_k)],  # random controls avoid exactly the heads under test
            eval_prompts,
            harmless_prompts=harmless_prompts,
            mc_items=mc_items,
            settings=_asr_settings(recipe),
            out=folder,
            resume=True,
            progress=progress,
        )

    asr = run.step("asr", measure)
    kmax = max(recipe.top_k)
    ablate = ablation(ranking[:kmax], recipe.mode, recipe.eps)
    examples = run.step("examples", examples_step(run, lm, evaluation, ablate))
    for example in examples["examples"]:
        example["prompt"] = example["prompt"][:300]
    rows = _asr_rows(recipe, asr, ranking)
    summary = _summary(recipe, asr, ranking, rows, len(eval_prompts))
    metrics = {"summary": summary, "ranking": ranking, "asr": asr}
    if located.get("bound"):
        metrics["ranking_bound"] = located["bound"]
    _report(run, recipe, metrics, rows, examples)
    return metrics


def _ci(values: Any) -> str:
    return "-" if not values or None in values else f"[{values[0]:.2f}, {values[1]:.2f}]"


def _asr_rows(recipe: ShipsRecipe, asr: dict[str, Any], ranking: list[Any]) -> list[list[Any]]:
    """The report table: ASR unmodified, with the top-k heads ablated, and with k random heads (mean ±
    sd over seeds), the paired lift top-k − random heads with its interval, and the verdict."""
    rows = [["unmodified", "-", asr["baseline"]["asr"], _ci(asr["baseline"].get("ci95")), "-", "-", "-"]]
    effects = asr.get("effects", {})
    for k in recipe.top_k:
        top = asr["ablated"][str(k)] if str(k) in asr["ablated"] else asr["ablated"][k]
        rand = asr["random"].get(str(k), asr["random"].get(k, {}))
        effect = effects.get(str(k), {})
        lift = effect.get("vs_random") or effect.get("vs_baseline") or {}
        random_cell = f"{rand['mean']:.2f} ± {rand['std']:.2f}" if "mean" in rand else "-"
        lift_cell = (
            "-"
            if lift.get("difference") is None
            else f"{lift['difference']:+.2f} {_ci([lift['low'], lift['high']])}"
        )
        rows.append(
            [
                f"top-{k} heads",
                ", ".join(f"{a}.{b}" for a, b in ranking[:k]),
                top["asr"],
                _ci(top.get("ci95")),
                random_cell,
                lift_cell,
                verdict_label(effect) if effect else "-",
            ]
        )
    return rows


def _summary(
    recipe: ShipsRecipe, asr: dict[str, Any], ranking: list[Any], rows: list[list[Any]], n_eval: int
) -> dict[str, Any]:
    kmax = max(recipe.top_k)
    summary = {
        "model": recipe.model,
        "mode": recipe.mode,
        "level": recipe.level if recipe.score == "ships" else "refusal log-prob drop (pre-ranked)",
        "top heads (layer.head)": ", ".join(f"{a}.{b}" for a, b in ranking[:5]),
        "ASR unmodified": asr["baseline"]["asr"],
        f"ASR with top-{kmax} ablated": rows[-1][2],
        f"ASR with {kmax} random heads (mean)": asr["random"].get(str(kmax), {}).get("mean", "-"),
        f"ASR with {kmax} random heads (mean ± sd)": rows[-1][4],
        f"top-{kmax} − random heads [95% CI]": rows[-1][5],
        f"verdict (top-{kmax} − random heads)": rows[-1][6],
        "evaluation prompts": n_eval,
    }
    for key, entry in (asr.get("helpfulness") or {}).items():
        summary[f"helpfulness {key}: over-refusal / KL / MC accuracy"] = (
            f"{entry['over_refusal']:.2f} / {entry['kl_mean']:.3f} / {entry.get('mc_accuracy', '-')}"
        )
    return summary


def _report(
    run: RunFolder,
    recipe: ShipsRecipe,
    metrics: dict[str, Any],
    rows: list[list[Any]],
    examples: dict[str, Any],
) -> None:
    effects = metrics["asr"].get("effects", {})
    verdicts = [(f"top-{k} heads", verdict_label(e), str(e.get("headline", ""))) for k, e in effects.items()]
    finish_report(
        run,
        metrics,
        title=f"Safety heads of {recipe.model} (Ships{' + Sahara' if recipe.sahara_group_size else ''})",
        table=(
            "Attack success rate on held-out harmful prompts",
            [
                "condition",
                "heads",
                "ASR",
                "ASR 95% CI",
                "random heads ASR ± sd",
                "top-k − random [CI]",
                "verdict",
            ],
        ),
        rows=rows,
        images=[*sorted((run.path / "steps" / "ships").glob("*.png")), *_asr_plots(metrics["asr"], run.path)],
        examples=examples,
        verdicts=verdicts,
        extra_tables=[bound_table(metrics["ranking_bound"])] if "ranking_bound" in metrics else [],
    )


def _asr_plots(asr: dict[str, Any], folder: Path) -> list[Path]:
    """ASR per condition with its 95% interval (error bars), random heads' mean ± sd beside it."""
    rates = []
    for name, entry in [
        ("unmodified", asr["baseline"]),
        *((f"top-{k}", v) for k, v in asr["ablated"].items()),
    ]:
        low, high = entry.get("ci95") or (None, None)
        if low is None or high is None:
            continue
        k = name.removeprefix("top-")
        rand = asr["random"].get(k, {}) if name != "unmodified" else {}
        rates.append(Rate(name, entry["asr"], low, high, rand.get("mean"), rand.get("std")))
    if not rates:
        return []
    return [plot_rates(rates, folder / "asr_rates.png", title="ASR", ylabel="attack success rate")]
