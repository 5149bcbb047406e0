"""The folder a head-attribution run writes (`locate ships|sahara|attribution`) and reads back.

A run folder collects everything about one attribution: `scores.safetensors` + `heads.json` (ranked
heads, a `HeadScores` folder), `heatmap.png`, `run.json` (settings, timing), `prompts.jsonl` (the
attribution prompts, so an evaluation can exclude them), `per_prompt_top.jsonl`, `sahara.json` (a
Sahara group), `checkpoint/` (resumable scan state), and after `ablate --from-run` `asr.json` +
`generations.jsonl`. Plots are drawn by the caller (`finesteer.report`); this module only writes
and reads the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.locate.scores import HeadScores
from finesteer.runs import RESULT_JSON, RUN_JSON, read_json_object, write_json_atomic
from finesteer.runs.lock import FolderLock, check_writable
from finesteer.sites import Head, parse_heads

CHECKPOINT_DIR = "checkpoint"
PROMPTS_FILE = "prompts.jsonl"
SAHARA_FILE = "sahara.json"
PER_PROMPT_FILE = "per_prompt_top.jsonl"
HEATMAP_FILE = "heatmap.png"
SCORES_FILE = "scores.safetensors"
HEADS_FILE = "heads.json"
ESTIMATE_DIR = "estimate"


class RunFolderError(FinesteerError, ValueError):
    """A run folder that cannot be used as asked (an unfinished run, no scores, all prompts excluded)."""


def prepare(out: Path, resume: bool) -> Path:
    """Create `out` and return its checkpoint folder; a checkpointed run is only continued with `resume`.

    Fails at once (before any model is loaded) when `out` is a file or cannot be written, or when
    another process is writing it (its lock is held)."""
    check_writable(out)
    with FolderLock(out):  # refused at once if another process holds it
        pass
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists() and any(checkpoint.iterdir()) and not resume:
        raise RunFolderError(
            f"{out} already holds a checkpointed run; pass --resume to continue it or choose --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


@contextmanager
def writing(out: Path, resume: bool) -> Iterator[Path]:
    """`with writing(out, resume) as checkpoint:` — `prepare`, then hold `out`'s lock until the block
    ends, so a second process on the same run folder is refused at once (before any model loads)."""
    with FolderLock(out):
        yield prepare(out, resume)


def write_run(folder: Path, payload: dict[str, Any]) -> None:
    """`run.json`: what the run was asked to do and what it found (written atomically)."""
    write_json_atomic(folder / RUN_JSON, payload, indent=1)


def read_run(folder: Path) -> dict[str, Any]:
    """`run.json` of a run folder; {} when there is none."""
    path = folder / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def write_prompts(folder: Path, queries: Sequence[str], ids: Sequence[str]) -> None:
    """`prompts.jsonl`: the attribution prompts (id, query), one per line.

    A folder holding a checkpointed scan keeps its prompts: other prompts are refused here (the scan
    would refuse them too, after this file had been replaced)."""
    text = "".join(json.dumps({"id": i, "query": q}) + "\n" for i, q in zip(ids, queries, strict=True))
    path = folder / PROMPTS_FILE
    checkpoint = folder / CHECKPOINT_DIR
    if path.is_file() and checkpoint.is_dir() and any(checkpoint.iterdir()) and path.read_text() != text:
        raise RunFolderError(
            f"{folder} holds a scan of other prompts ({PROMPTS_FILE} differs); resume it with the same "
            "--data/--split/--limit, or choose another --out"
        )
    path.write_text(text)


def read_prompts(folder: Path) -> list[str] | None:
    """The attribution queries of a run folder; None when it recorded none."""
    path = folder / PROMPTS_FILE
    if not path.is_file():
        return None
    return [json.loads(line)["query"] for line in path.read_text().splitlines() if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def exclude_run_prompts(
    run: Path, queries: Sequence[str], ids: Sequence[str]
) -> tuple[list[str], list[str], int]:
    """(queries, ids, n_dropped): the evaluation prompts minus those the run attributed on.

    Prompts match after lower-casing and collapsing whitespace, so a head is never judged on a
    prompt it was chosen with.
    """
    seen = read_prompts(run)
    if seen is None:
        return list(queries), list(ids), 0
    normalised = {_norm(q) for q in seen}
    kept = [(q, i) for q, i in zip(queries, ids, strict=True) if _norm(q) not in normalised]
    if not kept:
        raise RunFolderError("every evaluation prompt was also an attribution prompt")
    return [q for q, _ in kept], [i for _, i in kept], len(queries) - len(kept)


def top_heads_json(scores: HeadScores, k: int = 10) -> list[dict[str, Any]]:
    return [{"head": f"{layer}.{head}", "score": score} for layer, head, score in scores.top(k)]


def _write_per_prompt_top(
    folder: Path, scores: HeadScores, queries: Sequence[str], ids: Sequence[str], n_heads: int
) -> None:
    if scores.per_prompt is None:
        return
    lines = []
    for i, row in enumerate(scores.per_prompt.flatten(1)):
        order = row.argsort(descending=True)[:10].tolist()
        top = {f"{j // n_heads}.{j % n_heads}": float(row[j]) for j in order}
        lines.append(json.dumps({"id": ids[i], "query": queries[i], "top": top}) + "\n")
    (folder / PER_PROMPT_FILE).write_text("".join(lines))


def save_level(
    folder: Path,
    scores: HeadScores,
    info: dict[str, Any],
    queries: Sequence[str],
    ids: Sequence[str],
    n_heads: int,
) -> dict[str, Any]:
    """One Ships level's scores folder: tables, per-prompt top heads, prompts and run.json.

    `info` holds the run's settings (data, split, limit, template, level, …); the returned payload
    (also written to run.json) adds the top heads and the paths, including the heatmap's, which the
    caller draws.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scores.extra.update({k: info[k] for k in ("data", "split", "limit", "template", "level")})
    scores.save(folder)
    write_prompts(folder, queries, ids)
    _write_per_prompt_top(folder, scores, queries, ids, n_heads)
    result = {
        **info,
        "top_heads": top_heads_json(scores),
        "out": str(folder),
        "scores": str(folder / SCORES_FILE),
        "heads_json": str(folder / HEADS_FILE),
        "heatmap": str(folder / HEATMAP_FILE),
    }
    write_run(folder, result)
    return result


def level_folder(folder: Path, level: str, combined: bool) -> Path:
    """Where one Ships level is saved: the run folder itself, or `folder/<level>` when both levels ran."""
    return folder / level if combined else folder


def save_ships(
    folder: Path,
    tables: dict[str, HeadScores],
    info: dict[str, Any],
    queries: Sequence[str],
    ids: Sequence[str],
    n_heads: int,
    *,
    r_main: int,
    combined: bool,
) -> dict[str, Any]:
    """Save every Ships level (`save_level`); the payload of the one level, or of both (`levels`)."""
    results = {}
    for name, scores in tables.items():
        extra = {"level": name, "r_main": r_main if name == "dataset" else None}
        target = level_folder(folder, name, combined)
        results[name] = save_level(target, scores, {**info, **extra}, queries, ids, n_heads)
    if not combined:
        (only,) = results.values()
        return only
    payload = {**info, "level": "both", "out": str(folder), "levels": results}
    write_run(folder, payload)
    return payload


def save_attribution(
    folder: Path,
    result: Any,
    queries: Sequence[str],
    ids: Sequence[str],
    info: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Save a pre-ranked attribution scan: `estimate/` (every head), the verified scores, prompts, run.json.

    `result` is `locate.attribution.pre_ranked_scan`'s; the payload lists the final ranking's top 10
    with their exact scores (None for heads not verified).
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_prompts(folder, queries, ids)
    result.estimate.save(folder / ESTIMATE_DIR)
    result.scores.save(folder)
    exact = dict(zip(result.verified, result.exact.mean(1).tolist(), strict=True))
    payload = {
        **info,
        "top_heads": [
            {"head": f"{layer}.{head}", "exact": exact.get((layer, head))}
            for layer, head in result.ranking()[:10]
        ],
        "agreement": result.agreement,
        "bound": result.bound.to_dict() if result.bound is not None else None,
        "seconds": seconds,
        "timing": result.seconds,
        "out": str(folder),
    }
    write_run(folder, payload)
    return payload


def write_sahara(folder: Path, result: Any) -> Path:
    """`sahara.json`: a Sahara search (`locate.sahara.SaharaResult`), its group and every step."""
    path = folder / SAHARA_FILE
    write_json_atomic(path, result.to_dict(), indent=1)
    return path


def run_heads(run: Path, count: int) -> list[Head]:
    """Heads of a run folder, best first: a Sahara group if there is one, else the top `count` by score."""
    sahara_file = run / SAHARA_FILE
    if sahara_file.is_file():
        return [(int(lay), int(h)) for lay, h in json.loads(sahara_file.read_text())["group"]]
    return HeadScores.load(run).top_heads(count)


def scores_folder(path: Path) -> Path:
    """A scores folder, or a run folder holding one (the Ships step's `scores`)."""
    for candidate in (path, path / "scores", path / "steps" / "ships" / "scores"):
        if (candidate / SCORES_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no scores.safetensors here, in scores/ or in steps/ships/scores/")


def ranking_from_folder(path: Path, k: int) -> list[Head]:
    """The head order a folder stands for: a `locate joint` run's forward-selection order (every head it
    chose), else the `k` best heads of the scores folder in or under `path` (for a pre-ranked scan, its
    verified heads by exact value, then the rest in the estimate's order)."""
    joint = path / RESULT_JSON
    if joint.is_file():
        forward = read_json_object(joint, RunFolderError).get("forward")
        if forward:
            return parse_heads(",".join(forward[-1]["heads"]))
    folder = scores_folder(path)
    scores = HeadScores.load(folder)
    verified = scores.extra.get("verified")
    if verified is None or k <= len(verified) or not (folder / ESTIMATE_DIR).is_dir():
        return scores.top_heads(k)
    # a pre-ranked scan holds exact values for its verified heads only (0 elsewhere): past them, the
    # order is the estimate's
    first = scores.top_heads(len(verified))
    rest = [h for h in HeadScores.load(folder / ESTIMATE_DIR).top_heads(scores.n_layers * scores.n_heads)]
    return (first + [h for h in rest if h not in first])[:k]
