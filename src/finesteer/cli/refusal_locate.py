"""`finesteer locate refusal-direction|head-direction|joint`: refusal at the finest grain.

`refusal-direction` fits the difference-of-means direction at every post-instruction position and
layer and chooses one on validation prompts (Arditi et al.); `head-direction` scores every head by
its write along that direction and compares the ranking with other head tables; `joint` grows a head
set by forward selection and, with `--search`, runs the resumable Optuna search over head sets and
ablation strength (refusal proxy vs harmless KL, Pareto front).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import locate_app
from finesteer.cli.common import run_command, show, stderr_console
from finesteer.cli.options import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    ModeOpt,
    OutOpt,
    ResumeOpt,
    SeedOpt,
    slug,
)

HarmfulOpt = Annotated[str, typer.Option("--harmful", help="Harmful prompt dataset.")]
HarmlessOpt = Annotated[str, typer.Option("--harmless", help="Harmless prompt dataset.")]
SplitOpt = Annotated[str | None, typer.Option(help="Split of both datasets (default: train).")]
PathsOpt = Annotated[str | None, typer.Option(help="Comma-separated scores or run folders.")]


def _prompts(lm: Any, name: str, split: str | None, limit: int | None) -> list[str]:
    """Chat-formatted prompts of a dataset split; rows the refusal-direction set took from
    JailbreakBench (the held-out evaluation set) are dropped."""
    from finesteer.data import load_dataset
    from finesteer.locate.ships import format_queries

    exclude = "jailbreakbench" if name == "refusal-direction-harmful" else ()
    items = load_dataset(name, split, limit, exclude_origins=exclude)
    return format_queries(lm, [getattr(i, "prompt", None) or i.question for i in items])


@locate_app.command("refusal-direction")
def refusal_direction(
    model: ModelArg,
    harmful: HarmfulOpt = "refusal-direction-harmful",
    harmless: HarmlessOpt = "refusal-direction-harmless",
    n_train: Annotated[int, typer.Option(help="Train prompts of each class (the means).")] = 32,
    n_val: Annotated[int, typer.Option(help="Validation prompts of each class (the choice).")] = 8,
    positions: Annotated[
        int | None, typer.Option(help="Post-instruction positions (default: the template's).")
    ] = None,
    max_layer_fraction: Annotated[
        float, typer.Option(help="Only layers below this share of the depth.")
    ] = 0.8,
    kl_max: Annotated[float, typer.Option(help="Largest harmless KL of an acceptable direction.")] = 0.1,
    shortlist: Annotated[int, typer.Option(help="Best-bypass candidates checked for induction and KL.")] = 8,
    batch_size: BatchOpt = 8,
    out: OutOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Fit the refusal direction (difference of means) and choose its layer and position on val prompts."""

    def work() -> dict[str, Any]:
        from finesteer.fit.refusal_direction_select import SelectionSettings, save_selection, select_direction
        from finesteer.models import load_model
        from finesteer.runs import FolderLock

        settings = SelectionSettings(positions, max_layer_fraction, kl_max, shortlist, batch_size)
        folder = out or Path("runs") / slug("refusal-direction", model, harmful)
        with FolderLock(folder):
            lm = load_model(model, device=device, dtype=dtype)
            sets = [
                _prompts(lm, name, split, n)
                for split, n in (("train", n_train), ("val", n_val))
                for name in (harmful, harmless)
            ]
            stderr_console().print(
                f"refusal direction of {model}: {n_train}+{n_train} train, {n_val}+{n_val} val"
            )
            direction, table = select_direction(lm, *sets, settings, progress=True)
            info = {
                "command": "locate refusal-direction",
                "model": model,
                "harmful": harmful,
                "harmless": harmless,
            }
            return save_selection(folder, lm, direction, table, info)

    result = run_command(work)
    show({k: v for k, v in result.items() if k != "candidates"} if not json_out else result, json_out)


@locate_app.command("head-direction")
def head_direction(
    model: ModelArg,
    direction: Annotated[
        Path, typer.Option(help="Refusal direction: a `locate refusal-direction` run folder or its artifact.")
    ],
    harmful: HarmfulOpt = "refusal-direction-harmful",
    harmless: HarmlessOpt = "refusal-direction-harmless",
    split: SplitOpt = "train",
    limit: LimitOpt = 32,
    compare: PathsOpt = None,
    k: Annotated[int, typer.Option(help="Top heads compared.")] = 10,
    batch_size: BatchOpt = 8,
    out: OutOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Score every head by its write along the refusal direction (harmful − harmless, one pass) and
    compare the ranking with other head tables (Spearman, top-k overlap)."""

    def work() -> dict[str, Any]:
        from finesteer.fit.refusal_direction import RefusalDirection
        from finesteer.locate.head_direction import head_direction_scores, ranking_agreement
        from finesteer.locate.run_folder import scores_folder, top_heads_json
        from finesteer.locate.scores import HeadScores
        from finesteer.models import load_model
        from finesteer.runs import FolderLock

        others = {p: HeadScores.load(scores_folder(Path(p))) for p in (compare or "").split(",") if p}
        folder = out or Path("runs") / slug("head-direction", model, harmful)
        with FolderLock(folder):
            lm = load_model(model, device=device, dtype=dtype)
            vector = RefusalDirection.load(direction, lm).vector
            pos = _prompts(lm, harmful, split, limit)
            scores = head_direction_scores(
                lm, pos, _prompts(lm, harmless, split, limit), vector, batch_size=batch_size
            )
            scores.save(folder)
            agreement = ranking_agreement({"refusal_direction": scores, **others}, k=k) if others else []
            return {
                "command": "locate head-direction",
                "model": model,
                "out": str(folder),
                "top": top_heads_json(scores, k),
                "agreement": agreement,
            }

    show(run_command(work), json_out)


@locate_app.command("joint")
def joint(
    model: ModelArg,
    pool_from: Annotated[
        str, typer.Option(help="Comma-separated scores/run folders whose top heads form the pool.")
    ],
    per_table: Annotated[int, typer.Option(help="Top heads taken from each table into the pool.")] = 5,
    harmful: HarmfulOpt = "refusal-direction-harmful",
    harmless: HarmlessOpt = "refusal-direction-harmless",
    split: SplitOpt = "val",
    limit: LimitOpt = 16,
    k: Annotated[int, typer.Option("--k", help="Heads chosen by forward selection.")] = 3,
    search: Annotated[bool, typer.Option(help="Also run the Optuna TPE search (finesteer[search]).")] = False,
    n_trials: Annotated[
        int, typer.Option(help="Search trials in total (a resume adds the missing ones).")
    ] = 40,
    max_heads: Annotated[int, typer.Option(help="Largest head set the search tries.")] = 3,
    min_strength: Annotated[float, typer.Option(help="Weakest ablation strength the search tries.")] = 0.5,
    mode: ModeOpt = "sc",
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Joint head sets: forward selection on the refusal proxy, and a search co-minimising refusal and KL."""

    def work() -> dict[str, Any]:
        from finesteer.locate.engine import encode_prompts
        from finesteer.locate.joint_heads import candidate_pool, forward_selection, head_name
        from finesteer.locate.joint_search import (
            SearchSettings,
            check_new_or_resuming,
            load_optuna,
            search_head_sets,
        )
        from finesteer.locate.refusal_proxy import base_last_logits
        from finesteer.locate.run_folder import scores_folder
        from finesteer.locate.scores import HeadScores
        from finesteer.models import load_model
        from finesteer.runs import RESULT_JSON, FolderLock, write_json_atomic

        settings = SearchSettings(n_trials, max_heads, min_strength, mode, seed, batch_size)
        tables = [HeadScores.load(scores_folder(Path(p))) for p in pool_from.split(",") if p]
        pool = candidate_pool(tables, per_table)
        folder = out or Path("runs") / slug("joint", model, harmful)
        if search:
            load_optuna()
            check_new_or_resuming(folder, resume)
        with FolderLock(folder):
            lm = load_model(model, device=device, dtype=dtype)
            pos = encode_prompts(lm, _prompts(lm, harmful, split, limit))
            neg = encode_prompts(lm, _prompts(lm, harmless, split, limit))
            base = base_last_logits(lm, neg, batch_size=batch_size)
            steps = forward_selection(
                lm,
                pos,
                pool,
                k,
                harmless=neg,
                base_logits=base,
                mode=mode,
                batch_size=batch_size,
                progress=True,
            )
            result: dict[str, Any] = {
                "command": "locate joint",
                "model": model,
                "out": str(folder),
                "pool": [head_name(h) for h in pool],
                "forward": [s.to_json() for s in steps],
            }
            if search:
                result["search"] = search_head_sets(lm, pos, neg, base, pool, folder, settings, resume=resume)
            write_json_atomic(folder / RESULT_JSON, result, indent=1)
            return result

    show(run_command(work), json_out)
