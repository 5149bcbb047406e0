"""Side-by-side comparison of steering methods on one behaviour: one table, also as JSON.

A method is evaluated as a `finesteer.fit.steering.Steering`: a model (the unmodified one, or a
fine-tuned copy), an optional intervention and an optional system prompt. Every steering gets the
same measurements:

* A/B test split, letter probability (CAA metric: the most probable option letter after "(",
  plus the mean normalised p(matching)) and generated-and-parsed answers (HSI metric);
* open-ended test questions: greedy replies scored by a judge (mean ± std), and their fluency
  (n-gram entropy, STA's measure);
* KL(p_unmodified ‖ p_steered) of the next token on harmless prompts (`finesteer.evaluate.kl`).

Results go to `out_dir`: `methods/<name>.json` per finished method, `results.json` for the whole
table, `generations/<name>.jsonl` (open-ended replies with verdicts) and `ab_generations/<name>.jsonl`.
The loop is `finesteer.runs.runner.run_jobs`: a rerun skips methods already finished with the same
settings, and `PendingSteering` defers fitting so a resumed run does not fit them again either.
The judge is chosen by `finesteer.evaluate.judge_choice`, the table drawn by `ComparisonResult`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finesteer.data.items import ABItem, OpenEndedItem
from finesteer.data.prompts import chat_prompt
from finesteer.errors import FinesteerError
from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
from finesteer.evaluate.compare_controls import ControlBuilder, compact_records, evaluate_controls
from finesteer.evaluate.compare_effects import add_effects
from finesteer.evaluate.compare_result import ComparisonResult
from finesteer.evaluate.compare_resume import digest, resume_problems, same_json
from finesteer.evaluate.eval_sets import EvalSet, prob_row
from finesteer.evaluate.harness import run_generations
from finesteer.evaluate.kl import next_token_kl_between
from finesteer.evaluate.scores import mean_std
from finesteer.evaluate.stats import mean_estimate, rate_estimate
from finesteer.evaluate.text import fluency, ngram_entropy
from finesteer.evaluate.verdict import Judge
from finesteer.fit.controls import CONTROL_SEEDS
from finesteer.fit.steering import Steering
from finesteer.generation import GenerationConfig
from finesteer.runs.files import write_json_atomic
from finesteer.runs.lock import FolderLock
from finesteer.runs.records import JsonFileRecords, Record
from finesteer.runs.runner import Job, run_jobs
from finesteer.scoring.ab import ABPrompt

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

RESULT_VERSION = 1


class ComparisonError(FinesteerError, ValueError):
    """A comparison that cannot run or resume (no setups, duplicate names, other settings in out_dir)."""


@dataclass(frozen=True)
class PendingSteering:
    """A steering built (fitted) only if its method has not already finished in the output folder.

    `key` describes the method's settings; a finished result made with another key is refused.
    """

    name: str
    build: Callable[[], Steering]
    key: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareSettings:
    """Evaluation settings shared by every method (greedy decoding by default)."""

    open_ended: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    ab_generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    ab_prompt_style: Literal["hsi", "caa"] = "hsi"
    batch_size: int = 8
    controls: int = len(CONTROL_SEEDS)

    def __post_init__(self) -> None:
        if isinstance(self.controls, bool) or self.controls < 0:
            raise ComparisonError(f"controls must be a number of control seeds ≥ 0, got {self.controls!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "open_ended": asdict(self.open_ended),
            "ab_generation": asdict(self.ab_generation),
            "ab_prompt_style": self.ab_prompt_style,
            "batch_size": self.batch_size,
            "controls": self.controls,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _open_ended(
    lm: LoadedModel,
    setup: Steering,
    open_ended_items: Sequence[OpenEndedItem],
    judge: Judge | None,
    settings: CompareSettings,
    out_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """Fluency and judged score of the open-ended answers (None with no items or no judge)."""
    system, iv = setup.system_prompt, setup.intervention
    if not open_ended_items:
        return {"fluency": None, "open_ended_n": 0, "open_ended_score": None, "open_ended_std": None}
    rows = run_generations(
        lm,
        open_ended_items,
        out_dir / "generations" / f"{setup.name}.jsonl" if out_dir is not None else None,
        format_fn=lambda text: chat_prompt(lm.tokenizer, text, system=system),
        config=settings.open_ended,
        intervention=iv,
        judges={"judge": judge} if judge is not None else None,
        progress=progress,
    )
    per_text = [_finite(ngram_entropy(row["response"])) for row in rows]
    result: dict[str, Any] = {
        "fluency": _finite(fluency([row["response"] for row in rows])),
        "open_ended_n": len(rows),
        "fluency_per_item": per_text,
        "fluency_interval": mean_estimate([v for v in per_text if v is not None]).to_dict(),
    }
    if judge is not None:
        scores = [row["verdicts"]["judge"]["score"] for row in rows]
        stats = mean_std(scores)
        result.update(
            open_ended_score=_finite(stats.mean),
            open_ended_std=_finite(stats.std),
            open_ended_n_unscored=stats.n_missing,
            open_ended_interval=mean_estimate([float(v) for v in scores if _finite(v) is not None]).to_dict(),
        )
    else:
        result.update(open_ended_score=None, open_ended_std=None, open_ended_n_unscored=len(rows))
    return result


def evaluate_setup(
    setup: Steering,
    *,
    reference: LoadedModel,
    ab_items: Sequence[ABItem],
    open_ended_items: Sequence[OpenEndedItem],
    harmless_prompts: Sequence[str],
    judge: Judge | None,
    settings: CompareSettings,
    out_dir: Path | None = None,
    progress: bool = True,
    eval_sets: Sequence[EvalSet] = (),
) -> dict[str, Any]:
    """All measurements of one steering (run on `reference` unless bound to a model), as a JSON-ready dict;
    with `eval_sets` (`--eval-data`) also the letter-probability matching rate on each extra test set."""

    started = time.perf_counter()
    lm = setup.lm if setup.lm is not None else reference
    iv, system = setup.intervention, setup.system_prompt
    result: dict[str, Any] = {"method": setup.name}
    prob = ab_matching_rate_prob(
        lm,
        ab_items,
        prompt=ABPrompt(system),
        intervention=iv,
        batch_size=settings.batch_size,
        progress=progress,
    )
    result.update(
        ab_matching_rate=prob.matching_rate,
        ab_mean_p_matching=prob.mean_p_matching,
        ab_ci95=list(prob.interval()),
        ab_n=prob.n,
        ab_by_matching_polarity=prob.by_matching_polarity(),
        ab_interval=prob.to_dict(per_item=False)["interval"],
        ab_per_item=compact_records(prob.per_item),
    )
    gen = ab_matching_rate_generated(
        lm,
        ab_items,
        system=system,
        intervention=iv,
        config=settings.ab_generation,
        prompt_style=settings.ab_prompt_style,
        progress=progress,
    )
    result.update(ab_matching_rate_generated=_finite(gen.matching_rate), ab_n_undefined=gen.n_undefined)
    result["ab_generated_interval"] = rate_estimate(gen.count, gen.n).to_dict()
    if eval_sets:
        result["eval_sets"] = [prob_row(lm, s, iv, system, settings.batch_size, progress) for s in eval_sets]
    if out_dir is not None:
        _write_jsonl(out_dir / "ab_generations" / f"{setup.name}.jsonl", gen.per_item)
    result.update(_open_ended(lm, setup, open_ended_items, judge, settings, out_dir, progress))
    if harmless_prompts:
        kl = next_token_kl_between(reference, setup, harmless_prompts, batch_size=settings.batch_size)
        result.update(kl_harmless=float(sum(kl) / len(kl)), kl_harmless_max=max(kl), kl_n=len(kl))
        result.update(kl_per_prompt=kl, kl_interval=mean_estimate(kl).to_dict())
    else:
        result.update(kl_harmless=None, kl_harmless_max=None, kl_n=0)
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    result["system_prompt"] = system
    result["model"] = lm.name
    result["n_edits"] = len(iv) if iv is not None else 0
    result["fit"] = setup.metadata
    return result


# --- the comparison -------------------------------------------------------------------------------


def _items_digest(
    ab_items: Sequence[ABItem], open_ended: Sequence[OpenEndedItem], harmless: Sequence[str]
) -> str:
    return digest(
        [
            [(i.id, i.question, i.matching) for i in ab_items],
            [(i.id, i.question) for i in open_ended],
            list(harmless),
        ]
    )


def check_names(entries: Sequence[Steering | PendingSteering]) -> None:
    """Names are unique and can name a result file."""
    if not entries:
        raise ComparisonError("no setups to compare")
    names = [s.name for s in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ComparisonError(f"setup names must be unique; repeated: {', '.join(duplicates)}")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ComparisonError(f"setup name {name!r} cannot name a result file")


def built(entry: Steering | PendingSteering) -> Steering:
    """The steering itself, or the pending one built (its name must match)."""
    steering = entry.build() if isinstance(entry, PendingSteering) else entry
    if steering.name != entry.name:
        raise ComparisonError(f"pending setup '{entry.name}' built a setup named '{steering.name}'")
    return steering


def method_store(folder: Path | None) -> JsonFileRecords | None:
    """The per-method record store of a comparison folder (`methods/<name>.json`), or None."""
    store = JsonFileRecords(folder / "methods") if folder is not None else None
    if store is not None:
        store.folder.mkdir(parents=True, exist_ok=True)
    return store


def run_methods(
    jobs: Sequence[Job],
    store: JsonFileRecords | None,
    on_method: Callable[[str, dict[str, Any], bool], None] | None,
    progress: bool,
) -> dict[str, Any]:
    """The resumable comparison loop: one job per method, {name: result}; `on_method(name, result,
    resumed)` after each."""

    def done(name: str, record: Record, resumed: bool) -> None:
        if on_method is not None:
            on_method(name, record["result"], resumed)

    records = run_jobs(jobs, store, on_done=done, progress=progress, desc="methods", unit="method")
    return {name: record["result"] for name, record in records.items()}


def compare_setups(
    setups: Sequence[Steering | PendingSteering],
    *,
    reference: LoadedModel,
    ab_items: Sequence[ABItem],
    open_ended_items: Sequence[OpenEndedItem] = (),
    harmless_prompts: Sequence[str] = (),
    judge: Judge | None = None,
    judge_name: str | None = None,
    settings: CompareSettings | None = None,
    out_dir: str | Path | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_method: Callable[[str, dict[str, Any], bool], None] | None = None,
    eval_sets: Sequence[EvalSet] = (),
    make_controls: ControlBuilder | None = None,
) -> ComparisonResult:
    """Evaluate every setup on the same items; `reference` is the unmodified model (KL baseline).

    `make_controls(steering, seeds)` builds each method's matched controls (`settings.controls`
    seeds; `finesteer.fit.controls`); they are scored on the A/B test split and stored with the
    method, and every row gets its effect against the unmodified model and its control, and a verdict.

    With `out_dir`, each finished method is saved and skipped on a rerun with the same settings
    (a `PendingSteering` is then not even built); a finished method made with other settings is an
    error. `on_method(name, result, resumed)` is called after each method (for progress logs).
    """
    check_names(setups)
    if not ab_items:
        raise ComparisonError("no A/B test items")
    settings = settings or CompareSettings()
    judge_desc = judge_name or ("none" if judge is None else repr(judge))
    shared_key = {
        "version": RESULT_VERSION,
        "reference": [reference.name, reference.fingerprint],
        "items": _items_digest(ab_items, open_ended_items, harmless_prompts),
        "settings": settings.to_dict(),
        "judge": judge_desc,
    }
    if eval_sets:  # extra test sets (--eval-data) are part of what a finished method was measured on
        shared_key["eval_sets"] = [[s.name, _items_digest(s.items, (), ())] for s in eval_sets]
    folder = Path(out_dir) if out_dir is not None else None
    store = method_store(folder)
    run_info = {**dict(info or {}), "settings": settings.to_dict(), "n_ab": len(ab_items)}
    run_info.update(n_open_ended=len(open_ended_items), n_harmless=len(harmless_prompts))

    def job(entry: Steering | PendingSteering) -> Job:
        pending_key = dict(entry.key) if isinstance(entry, PendingSteering) else None

        def run() -> Record:
            setup = built(entry)
            result = evaluate_setup(
                setup,
                reference=reference,
                ab_items=ab_items,
                open_ended_items=open_ended_items,
                harmless_prompts=harmless_prompts,
                judge=judge,
                settings=settings,
                out_dir=folder,
                progress=progress,
                eval_sets=eval_sets,
            )
            result["control"] = evaluate_controls(
                setup, reference, ab_items, make_controls, settings.controls, settings.batch_size, progress
            )
            return {
                "shared_key": shared_key,
                "pending_key": pending_key,
                "setup_key": setup.identity(reference),
                "result": result,
            }

        def check(saved: Record) -> None:
            path = store.path(entry.name) if store is not None else Path(entry.name)
            setup_key = entry.identity(reference) if isinstance(entry, Steering) else None
            problems = resume_problems(saved, shared_key, pending_key, setup_key)
            if problems:
                raise ComparisonError(
                    f"{path} was made with other {', '.join(problems)}; use another --out folder or delete "
                    "the file to evaluate this method again"
                )

        return Job(entry.name, run, check)

    with FolderLock(folder) if folder is not None else nullcontext():  # a second writer is refused
        results = add_effects(run_methods([job(e) for e in setups], store, on_method, progress))
        comparison = ComparisonResult(results, judge_desc, run_info, folder)
        if folder is not None:
            write_json_atomic(folder / "results.json", comparison.to_json(), indent=1)
    return comparison


__all__ = [
    "CompareSettings", "ComparisonError", "ComparisonResult", "PendingSteering", "built", "check_names",
    "compare_setups", "digest", "evaluate_setup", "same_json",
]  # fmt: skip
