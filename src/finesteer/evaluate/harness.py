"""Generation harness: generate for many prompts, judge, and stream one JSON row per prompt to disk.

Long generation runs get interrupted (a kill, a judge endpoint failing). Every finished batch is
appended to a JSONL file and flushed (`finesteer.runs.records.JsonlRecords`, keyed by item id),
and a run started again on the same file skips the ids
already there: nothing is lost and nothing is written twice. A last line cut short by a kill is
dropped and that prompt generated again. A sidecar `<file>.meta.json` (a `finesteer.runs.RunManifest`)
records the model fingerprint, the decoding settings, intervention and judges, and a resumed run with
other settings is refused, naming the difference, rather than mixing two experiments in one file. A
stored row is reused only for the same id *and* the same formatted prompt: another data set whose ids
collide (or another system prompt or template) is refused, naming the first differing id.
The output folder is locked while rows are written (`finesteer.runs.FolderLock`): a second writer
is refused at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finesteer.data.items import ABItem, OpenEndedItem, PromptItem
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.errors import EvaluationError
from finesteer.evaluate.verdict import Judge, Verdict
from finesteer.generation import GenerationConfig, generate
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.runs.lock import FolderLock
from finesteer.runs.manifest import RunManifest, check_manifest
from finesteer.runs.records import JsonlRecords
from finesteer.scoring.forward import check_rows, rows_for_batch

HarnessItem = PromptItem | OpenEndedItem | ABItem | tuple[str, str]
"""A prompt to generate for: a dataset row, or an (id, user text) pair."""


class ResumeError(EvaluationError):
    """The output file cannot be resumed (corrupt row, other settings, duplicate ids)."""


def item_id(item: HarnessItem) -> str:
    return str(item[0]) if isinstance(item, tuple) else item.id


def item_text(item: HarnessItem) -> str:
    """The user text of an item: a prompt item's prompt, an A/B or open-ended item's question."""
    if isinstance(item, tuple):
        return item[1]
    if isinstance(item, PromptItem):
        return item.prompt
    return item.question


def verdict_record(verdict: Verdict) -> dict[str, Any]:
    return {"label": verdict.label, "score": verdict.score, "reason": verdict.reason, "raw": verdict.raw}


def _meta_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".meta.json")


def _check_row(line_no: int, row: Any) -> None:
    if not isinstance(row, dict) or "id" not in row or "response" not in row:
        raise ResumeError(f"line {line_no}: not a harness row (needs 'id' and 'response')")


def open_rows(out_path: str | Path) -> JsonlRecords:
    """The harness JSONL file as an append-only record store (`finesteer.runs.records.JsonlRecords`).

    A final line without its newline is an interrupted write: it is removed from the file (so the
    next append starts on a clean line) and run again. A malformed line elsewhere, or an id stored
    twice, is a `ResumeError` naming the line, because silently skipping it would lose a row.
    """
    path = Path(out_path)

    def check(line_no: int, row: Any) -> None:
        try:
            _check_row(line_no, row)
        except ResumeError as exc:
            raise ResumeError(f"{path}, {exc}") from None

    return JsonlRecords(path, validate=check, error=ResumeError)


def read_rows(out_path: str | Path) -> list[dict[str, Any]]:
    """The complete rows of a harness JSONL file, repairing a last line cut short by a kill."""
    return list(open_rows(out_path))


def _describe_judge(judge: Judge) -> str:
    """The judge's settings as text (its repr), or its class name when the repr is only an address."""
    text = repr(judge)
    return type(judge).__qualname__ if " at 0x" in text else text


def _truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def run_generations(
    lm: LoadedModel,
    items: Sequence[HarnessItem],
    out_path: str | Path | None,
    *,
    format_fn: Callable[[str], str] | None = None,
    config: GenerationConfig | None = None,
    intervention: Intervention | None = None,
    judges: Mapping[str, Judge] | None = None,
    stop: Sequence[str] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate a reply for every item, judge it, and return one row per item, in item order.

    Row: `id`, `index` (position in `items`), `prompt` (user text), `formatted_prompt`, `response`
    and, with judges, `verdicts` {judge name: {label, score, reason, raw}}. `format_fn` turns the
    user text into the model input (default: the chat template, no system prompt). `stop` strings
    cut the response at the first occurrence (after generation; the EOS token already stops it).

    With `out_path` rows are appended batch by batch to that JSONL file and a re-run resumes (see
    the module doc); `None` keeps everything in memory. Greedy by default; with sampling, batch b is
    seeded `config.seed + index of its first item`, so a resumed sampled run matches an
    uninterrupted one only when its batches start at the same items. A per-row intervention gives
    item i (its position in `items`) the i-th intervention.
    """
    config = config or GenerationConfig()
    items = list(items)
    if not items:
        raise EvaluationError("no prompts to generate for")
    ids = [item_id(item) for item in items]
    duplicates = sorted(key for key, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise EvaluationError(f"item ids must be unique to resume a run; repeated: {duplicates[:5]}")
    check_rows(intervention, len(items))
    if intervention is not None:
        intervention.validate(lm.info)
    judges = dict(judges or {})
    for name, judge in judges.items():
        if not isinstance(judge, Judge):
            raise EvaluationError(f"judge {name!r} has no judge()/judge_many() methods")
    fmt = format_fn or (lambda text: chat_prompt(lm.tokenizer, text))

    if out_path is None:
        return _generate_rows(lm, items, ids, None, fmt, config, intervention, judges, stop, progress)
    path = Path(out_path)
    with FolderLock(path.parent):
        store = open_rows(path)
        manifest = RunManifest(
            "generations",
            model=lm.fingerprint,
            settings={
                "model": lm.name,
                # the batch size is left out: a resumed run may use another one
                "config": {k: v for k, v in asdict(config).items() if k != "batch_size"},
                "intervention": intervention.digest() if intervention is not None else "none",
                "judges": {name: _describe_judge(judge) for name, judge in sorted(judges.items())},
                "stop": list(stop),
            },
        )
        check_manifest(_meta_path(path), manifest, resuming=len(store) > 0, error=ResumeError)
        _check_stored_prompts(path, store, items, ids, fmt)
        return _generate_rows(lm, items, ids, store, fmt, config, intervention, judges, stop, progress)


def _check_stored_prompts(
    path: Path, store: JsonlRecords, items: list[HarnessItem], ids: list[str], fmt: Callable[[str], str]
) -> None:
    """Refuse stored rows whose id matches an item but whose formatted prompt does not."""
    for item, key in zip(items, ids, strict=True):
        row = store.get(key)
        if row is None or "formatted_prompt" not in row:
            continue
        now = fmt(item_text(item))
        if row["formatted_prompt"] != now:
            raise ResumeError(
                f"{path} holds another prompt under id {key!r} (stored: {row['prompt']!r:.60}, "
                f"now: {item_text(item)!r:.60}): it was made from other data, system prompt or "
                "template; use another output folder or delete it to start over"
            )


def _generate_rows(
    lm: LoadedModel,
    items: list[HarnessItem],
    ids: list[str],
    store: JsonlRecords | None,
    fmt: Callable[[str], str],
    config: GenerationConfig,
    intervention: Intervention | None,
    judges: dict[str, Judge],
    stop: Sequence[str],
    progress: bool,
) -> list[dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {row["id"]: row for row in store} if store is not None else {}

    todo = [i for i, item_key in enumerate(ids) if item_key not in done]
    bar = tqdm(
        total=len(items), initial=len(items) - len(todo), desc="generate", unit="prompt", disable=not progress
    )
    try:
        for start in range(0, len(todo), config.batch_size):
            indices = todo[start : start + config.batch_size]
            texts = [item_text(items[i]) for i in indices]
            formatted = [fmt(text) for text in texts]
            batch_config = replace(
                config,
                batch_size=len(indices),
                seed=None if config.seed is None else config.seed + indices[0],
            )
            responses = generate(
                lm, formatted, batch_config, intervention=rows_for_batch(intervention, indices)
            )
            responses = [_truncate_at_stop(r, stop) for r in responses] if stop else responses
            verdicts = {
                name: judge.judge_many(list(zip(texts, responses, strict=True)))
                for name, judge in judges.items()
            }
            rows = []
            for row_in_batch, i in enumerate(indices):
                row: dict[str, Any] = {
                    "id": ids[i],
                    "index": i,
                    "prompt": texts[row_in_batch],
                    "formatted_prompt": formatted[row_in_batch],
                    "response": responses[row_in_batch],
                }
                if judges:
                    row["verdicts"] = {name: verdict_record(v[row_in_batch]) for name, v in verdicts.items()}
                done[ids[i]] = row
                rows.append(row)
            if store is not None:
                store.extend(rows)
            bar.update(len(indices))
    finally:
        bar.close()
    return [done[i] for i in ids]
