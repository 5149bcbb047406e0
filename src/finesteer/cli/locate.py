"""Safety-head commands: `locate ships`, `locate sahara`, `ablate`, `export-surgery`.

A run folder collects everything about one attribution: `scores.safetensors` + `heads.json` (ranked
heads), `heatmap.png`, `run.json` (settings, timing), `prompts.jsonl` (the attribution prompts, so
an evaluation can exclude them), `checkpoint/` (resumable scan state), and after `ablate --from-run`
`asr.json` + `generations.jsonl`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import app, locate_app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.runs import RUN_JSON, write_json_atomic

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ModelArg = Annotated[str, typer.Argument(help="Registry name, tiny-* name, HF folder or hub id.")]
DataOpt = Annotated[str, typer.Option("--data", help="Prompt dataset (e.g. advbench, jailbreakbench).")]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split (default: the dataset's default).")]
LimitOpt = Annotated[int | None, typer.Option(help="Use the first N prompts.")]
ModeOpt = Annotated[str, typer.Option(help="ua = uniform attention (query × ε), sc = scale output × ε.")]
EpsOpt = Annotated[float, typer.Option(help="Ablation factor ε.")]
TemplateOpt = Annotated[
    str,
    typer.Option(help="'chat' (chat template), 'ships' / 'sahara' (authors' raw templates), or '…{query}…'."),
]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward.")]
EngineOpt = Annotated[
    str, typer.Option(help="Scan engine: 'fast' (heads batched, earlier layers reused) or 'simple'.")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<command>-<model>-…).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a checkpointed run in --out.")]

CHECKPOINT_DIR = "checkpoint"
PROMPTS_FILE = "prompts.jsonl"


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", Path(p).name if "/" in p else p) for p in parts if p)


def _queries(data: str, split: str | None, limit: int | None) -> tuple[list[str], list[str]]:
    """(texts, ids) of a prompt dataset; A/B or open-ended items contribute their question."""
    from finesteer.data import load_dataset

    items = load_dataset(data, split=split, limit=limit)
    if not items:
        raise ValueError(f"dataset {data!r} (split {split!r}) has no items")
    texts, ids = [], []
    for item in items:
        text = getattr(item, "prompt", None) or getattr(item, "question", None)
        if not text:
            raise ValueError(f"dataset {data!r} items have no prompt/question text")
        texts.append(text)
        ids.append(str(item.id))
    return texts, ids


def _prepare_out(out: Path, resume: bool) -> Path:
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists() and any(checkpoint.iterdir()) and not resume:
        raise ValueError(
            f"{out} already holds a checkpointed run; pass --resume to continue it or choose --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def _write_prompts(out: Path, queries: list[str], ids: list[str]) -> None:
    lines = (json.dumps({"id": i, "query": q}) + "\n" for i, q in zip(ids, queries, strict=True))
    (out / PROMPTS_FILE).write_text("".join(lines))


def _top_json(scores: Any, k: int = 10) -> list[dict[str, Any]]:
    return [{"head": f"{layer}.{head}", "score": score} for layer, head, score in scores.top(k)]


def _save_level(
    folder: Path, scores: Any, info: dict[str, Any], queries: list[str], ids: list[str], n_heads: int
) -> dict[str, Any]:
    """One level's scores folder: tables, heatmap, per-prompt top heads, prompts and run.json."""
    from finesteer.report.heatmap import plot_head_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    scores.extra.update({k: info[k] for k in ("data", "split", "limit", "template", "level")})
    scores.save(folder)
    title = f"Ships {info['level']} {info['mode']} · {info['model']} · {info['data']}"
    plot_head_heatmap(scores, folder / "heatmap.png", title=title)
    _write_prompts(folder, queries, ids)
    if scores.per_prompt is not None:
        lines = []
        for i, row in enumerate(scores.per_prompt.flatten(1)):
            order = row.argsort(descending=True)[:10].tolist()
            top = {f"{j // n_heads}.{j % n_heads}": float(row[j]) for j in order}
            lines.append(json.dumps({"id": ids[i], "query": queries[i], "top": top}) + "\n")
        (folder / "per_prompt_top.jsonl").write_text("".join(lines))
    result = {
        **info,
        "top_heads": _top_json(scores),
        "out": str(folder),
        "scores": str(folder / "scores.safetensors"),
        "heads_json": str(folder / "heads.json"),
        "heatmap": str(folder / "heatmap.png"),
    }
    write_json_atomic(folder / RUN_JSON, result, indent=1)
    return result


@locate_app.command("ships")
def ships(
    model: ModelArg,
    data: DataOpt,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    level: Annotated[
        str,
        typer.Option(
            help="query (next-token KL), dataset (principal angles), or both from one scan "
            "(then written to OUT/query and OUT/dataset)."
        ),
    ] = "query",
    r_main: Annotated[int, typer.Option(help="Principal angles summed (dataset level).")] = 1,
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: OutOpt = None,
    resume: ResumeOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Score every head by how much ablating it changes the model's response to harmful prompts."""

    def work() -> dict[str, Any]:
        from finesteer.locate import ships as ships_lib
        from finesteer.models import load_model

        if level not in ("query", "dataset", "both"):
            raise ValueError(f"--level must be 'query', 'dataset' or 'both', got {level!r}")
        ships_lib.ablation_method(mode)
        folder = out or Path("runs") / _slug("ships", model, data, mode, level)
        checkpoint = _prepare_out(folder, resume)
        queries, ids = _queries(data, split, limit)
        lm = load_model(model)
        prompts = ships_lib.format_queries(lm, queries, template)
        _write_prompts(folder, queries, ids)
        levels = ("query", "dataset") if level == "both" else (level,)
        stderr_console().print(
            f"Ships {'+'.join(levels)} ({mode}, ε={eps}) on {len(prompts)} prompts × "
            f"{lm.info.n_layers * lm.info.n_heads} heads of {model}"
        )
        started = time.perf_counter()
        tables = ships_lib.ships_scores(
            lm,
            prompts,
            levels=levels,
            mode=mode,
            eps=eps,
            r_main=r_main,
            batch_size=batch_size,
            checkpoint=checkpoint,
            engine=engine,
        )
        seconds = round(time.perf_counter() - started, 1)
        info = {
            "command": "locate ships",
            "model": model,
            "data": data,
            "split": split,
            "limit": limit,
            "n_prompts": len(prompts),
            "mode": mode,
            "eps": eps,
            "template": template,
            "seconds": seconds,
        }
        results = {}
        for name, scores in tables.items():
            target = folder / name if level == "both" else folder
            extra = {"level": name, "r_main": r_main if name == "dataset" else None}
            results[name] = _save_level(target, scores, {**info, **extra}, queries, ids, lm.info.n_heads)
        if level != "both":
            return results[level]
        combined = {**info, "level": "both", "out": str(folder), "levels": results}
        write_json_atomic(folder / RUN_JSON, combined, indent=1)
        return combined

    result = run_command(work)
    _show(result, json_out)


@locate_app.command("sahara")
def sahara(
    model: ModelArg,
    data: DataOpt,
    split: SplitOpt = None,
    limit: LimitOpt = None,
    group_size: Annotated[int, typer.Option(help="Heads in the group.")] = 3,
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    r_main: Annotated[int, typer.Option(help="Principal angles summed.")] = 1,
    candidates_from: Annotated[
        Path | None, typer.Option(help="Search only the top --top-n heads of this scores folder.")
    ] = None,
    top_n: Annotated[int, typer.Option(help="Candidates kept from --candidates-from.")] = 32,
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    engine: EngineOpt = "fast",
    out: OutOpt = None,
    resume: ResumeOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Greedily find the head group whose joint ablation moves the safety subspace most."""

    def work() -> dict[str, Any]:
        from finesteer.locate import ships as ships_lib
        from finesteer.locate.sahara import sahara as run_sahara
        from finesteer.locate.scores import HeadScores
        from finesteer.models import load_model
        from finesteer.report.heatmap import plot_head_heatmap

        ships_lib.ablation_method(mode)
        folder = out or Path("runs") / _slug("sahara", model, data, mode)
        checkpoint = _prepare_out(folder, resume)
        candidates = HeadScores.load(candidates_from).top_heads(top_n) if candidates_from else None
        queries, ids = _queries(data, split, limit)
        lm = load_model(model)
        prompts = ships_lib.format_queries(lm, queries, template)
        _write_prompts(folder, queries, ids)
        started = time.perf_counter()
        result = run_sahara(
            lm,
            prompts,
            group_size=group_size,
            mode=mode,
            eps=eps,
            r_main=r_main,
            candidates=candidates,
            batch_size=batch_size,
            checkpoint=checkpoint,
            engine=engine,
        )
        seconds = round(time.perf_counter() - started, 1)
        (folder / "sahara.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        first = result.step_scores(lm, 0)
        first.extra.update(data=data, split=split, limit=limit, template=template)
        first.save(folder)
        plot_head_heatmap(first, folder / "heatmap.png", title=f"Sahara step 1 {mode} · {model} · {data}")
        payload = {
            "command": "locate sahara",
            "model": model,
            "data": data,
            "split": split,
            "n_prompts": len(prompts),
            "mode": mode,
            "eps": eps,
            "r_main": r_main,
            "template": template,
            "group": [f"{layer}.{head}" for layer, head in result.group],
            "step_scores": [s.score for s in result.steps],
            "seconds": seconds,
            "out": str(folder),
            "sahara_json": str(folder / "sahara.json"),
            "heatmap": str(folder / "heatmap.png"),
        }
        write_json_atomic(folder / RUN_JSON, payload, indent=1)
        return payload

    result = run_command(work)
    _show(result, json_out)


def _run_heads(run: Path, count: int) -> list[tuple[int, int]]:
    """Heads of a run folder, best first: a Sahara group if there is one, else the score ranking."""
    from finesteer.locate.scores import HeadScores

    sahara_file = run / "sahara.json"
    if sahara_file.is_file():
        return [(int(lay), int(h)) for lay, h in json.loads(sahara_file.read_text())["group"]]
    return HeadScores.load(run).top_heads(count)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@app.command("ablate")
def ablate(
    model: ModelArg,
    data: DataOpt,
    heads: Annotated[str | None, typer.Option(help="Ranked heads LAYER.HEAD,… (best first).")] = None,
    from_run: Annotated[
        Path | None, typer.Option(help="Take the ranked heads (or Sahara group) from this run folder.")
    ] = None,
    eval_kind: Annotated[str, typer.Option("--eval", help="What to measure: asr.")] = "asr",
    split: SplitOpt = None,
    limit: LimitOpt = None,
    ks: Annotated[str | None, typer.Option(help="Head counts to ablate, e.g. 1,2,3 (default 1..5).")] = None,
    mode: Annotated[str | None, typer.Option(help="ua or sc (default: the run's mode, else ua).")] = None,
    eps: Annotated[
        float | None, typer.Option(help="Ablation factor ε (default: the run's, else 1e-5).")
    ] = None,
    random_seeds: Annotated[int, typer.Option(help="Random-head control sets per k.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt (greedy).")] = 64,
    harmless: Annotated[
        str | None, typer.Option(help="Harmless dataset for helpfulness ('none' to skip).")
    ] = "jailbreakbench-benign",
    harmless_limit: Annotated[int | None, typer.Option(help="Harmless prompts (default: --limit).")] = None,
    helpfulness_ks: Annotated[
        str | None, typer.Option(help="Head counts whose helpfulness is measured (default: all --ks).")
    ] = None,
    mc: Annotated[
        str, typer.Option(help="Multiple-choice set for helpfulness accuracy ('none' to skip).")
    ] = "finesteer-mc",
    template: TemplateOpt = "chat",
    batch_size: BatchOpt = 8,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Ablate the top-k heads and measure ASR against the unmodified model and random heads."""

    def work() -> dict[str, Any]:
        from finesteer.evaluate.asr_effect import AsrSettings, asr_effect
        from finesteer.locate import ships as ships_lib
        from finesteer.models import load_model
        from finesteer.sites import parse_heads

        if eval_kind != "asr":
            raise ValueError(f"--eval {eval_kind!r} is not supported; choose 'asr'")
        if (heads is None) == (from_run is None):
            raise ValueError("give exactly one of --heads or --from-run")
        run_file = from_run / RUN_JSON if from_run else None
        run_info = json.loads(run_file.read_text()) if run_file and run_file.is_file() else {}
        chosen_mode = mode or run_info.get("mode") or "ua"
        chosen_eps = eps if eps is not None else float(run_info.get("eps") or 1e-5)
        k_list = tuple(int(k) for k in ks.split(",")) if ks else None
        if from_run is not None:
            ranked = _run_heads(from_run, max(k_list or (5,)))
        else:
            ranked = parse_heads(heads or "")
        k_values = k_list or tuple(range(1, min(5, len(ranked)) + 1))
        queries, ids = _queries(data, split, limit)
        excluded = 0
        if from_run is not None and (from_run / PROMPTS_FILE).is_file():
            seen = {
                _norm(json.loads(line)["query"])
                for line in (from_run / PROMPTS_FILE).read_text().splitlines()
                if line.strip()
            }
            kept = [(q, i) for q, i in zip(queries, ids, strict=True) if _norm(q) not in seen]
            excluded = len(queries) - len(kept)
            if not kept:
                raise ValueError("every evaluation prompt was also an attribution prompt")
            queries, ids = [q for q, _ in kept], [i for _, i in kept]
            if excluded:
                stderr_console().print(f"dropped {excluded} evaluation prompts that were attribution prompts")
        lm = load_model(model)
        harmful = ships_lib.format_queries(lm, queries, template)
        harmless_prompts = None
        if harmless and harmless.lower() != "none":
            texts, _ = _queries(harmless, None, harmless_limit or limit)
            harmless_prompts = ships_lib.format_queries(lm, texts, template)
        mc_items = None
        if harmless_prompts is not None and mc.lower() != "none":
            from finesteer.data import load_dataset

            mc_items = load_dataset(mc)
        folder = out or from_run or Path("runs") / _slug("ablate", model, data, chosen_mode)
        settings = AsrSettings(
            ks=k_values,
            mode=chosen_mode,
            eps=chosen_eps,
            random_seeds=tuple(range(random_seeds)),
            helpfulness_ks=tuple(int(k) for k in helpfulness_ks.split(",")) if helpfulness_ks else None,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        stderr_console().print(
            f"ASR on {len(harmful)} prompts of {data}: baseline, top-k for k={list(k_values)}, "
            f"{random_seeds} random sets per k ({chosen_mode}, ε={chosen_eps})"
        )
        result = asr_effect(
            lm,
            ranked,
            harmful,
            harmless_prompts=harmless_prompts,
            mc_items=mc_items,
            settings=settings,
            out=folder,
            resume=resume,
            prompt_ids=ids,
            metadata={
                "data": data,
                "split": split,
                "template": template,
                "excluded_overlap": excluded,
                "harmless_data": harmless,
                "mc_data": mc if mc_items else None,
                "from_run": str(from_run or ""),
            },
        )
        return {
            "command": "ablate",
            "model": model,
            "data": data,
            "n_prompts": len(harmful),
            "excluded_overlap": excluded,
            "heads": [f"{layer}.{head}" for layer, head in ranked],
            "mode": chosen_mode,
            "eps": chosen_eps,
            "baseline_asr": result["baseline"]["asr"],
            "ablated_asr": {k: v["asr"] for k, v in result["ablated"].items()},
            "random_asr_mean": {k: v["mean"] for k, v in result["random"].items()},
            "random_asr_std": {k: v["std"] for k, v in result["random"].items()},
            "helpfulness": result.get("helpfulness"),
            "out": str(folder),
            "asr_json": str(folder / "asr.json"),
            "generations": str(folder / "generations.jsonl"),
        }

    result = run_command(work)
    _show(result, json_out)


@app.command("export-surgery")
def export_surgery(
    model: ModelArg,
    heads: Annotated[str, typer.Option(help="Heads to ablate, LAYER.HEAD,…")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the exported HF model (must be empty).")],
    mode: ModeOpt = "ua",
    eps: EpsOpt = 1e-5,
    verify: Annotated[
        bool, typer.Option(help="Reload with plain transformers and compare logits with the hooked model.")
    ] = True,
    json_out: JsonFlag = False,
) -> None:
    """Export a copy of the model with the head ablation baked into its weights (plain HF folder)."""

    def work() -> dict[str, Any]:
        from finesteer.models import load_model
        from finesteer.sites import parse_heads
        from finesteer.surgery import export_surgery as run_export
        from finesteer.surgery import verify_export

        lm = load_model(model)
        head_list = parse_heads(heads)
        folder = run_export(lm, head_list, out, mode=mode, eps=eps)
        result: dict[str, Any] = {
            "command": "export-surgery",
            "model": model,
            "heads": [f"{layer}.{head}" for layer, head in head_list],
            "mode": mode,
            "eps": eps,
            "out": str(folder),
        }
        if verify:
            result["verify"] = verify_export(lm, head_list, folder, mode=mode, eps=eps)
        return result

    result = run_command(work)
    _show(result, json_out)


def _show(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(result.get("command", "")))
    for key, value in result.items():
        if key == "command":
            continue
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, text)
    Console().print(table)


def _scores_folder(path: Path) -> Path:
    """A scores folder, or a run folder holding one (the Ships step's `scores`)."""
    for candidate in (path, path / "scores", path / "steps" / "ships" / "scores"):
        if (candidate / "scores.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no scores.safetensors here, in scores/ or in steps/ships/scores/")


@locate_app.command("overlap")
def overlap_command(
    first: Annotated[Path, typer.Argument(help="Scores folder (or a run folder holding one).")],
    second: Annotated[Path, typer.Argument(help="The other scores folder or run folder.")],
    k: Annotated[int, typer.Option(help="How many top heads to compare.")] = 10,
    json_out: JsonFlag = False,
) -> None:
    """How much two head tables agree: top-k Jaccard, shared heads and Spearman over all heads.

    For two methods or modes on one model, or two checkpoints of one architecture (e.g. a base and a
    fine-tuned model); tables of different shapes are refused.
    """

    def work() -> dict[str, Any]:
        from finesteer.locate.rank_stats import spearman
        from finesteer.locate.scores import HeadScores, jaccard_top_k

        a, b = (HeadScores.load(_scores_folder(p)) for p in (first, second))
        jaccard = jaccard_top_k(a, b, k)
        shared = sorted(set(a.top_heads(k)) & set(b.top_heads(k)))
        return {
            "first": {"path": str(first), "model": a.model_name, "method": a.method, "mode": a.mode},
            "second": {"path": str(second), "model": b.model_name, "method": b.method, "mode": b.mode},
            "k": k,
            "jaccard": jaccard,
            "shared": [f"{layer}.{head}" for layer, head in shared],
            "spearman": spearman(a.scores.flatten(), b.scores.flatten()),
            "top_first": [f"{layer}.{head}" for layer, head in a.top_heads(k)],
            "top_second": [f"{layer}.{head}" for layer, head in b.top_heads(k)],
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    stderr_console().print(
        f"top-{k} Jaccard {result['jaccard']:.2f} ({len(result['shared'])} shared: "
        f"{', '.join(result['shared']) or 'none'}); Spearman over all heads {result['spearman']:.2f}"
    )
