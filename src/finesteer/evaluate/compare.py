"""Side-by-side comparison of steering methods on one behaviour: one table, also as JSON.

A method is evaluated as a `SteeringSetup`: a model (the unmodified one, or a fine-tuned copy), an
optional intervention and an optional system prompt. Every setup gets the same measurements:

* A/B test split, letter probability (CAA metric: the most probable option letter after "(",
  plus the mean normalised p(matching)) and generated-and-parsed answers (HSI metric);
* open-ended test questions: greedy replies scored by a judge (mean ± std), and their fluency
  (n-gram entropy, STA's measure);
* KL(p_unmodified ‖ p_setup) of the next token on harmless prompts: the collateral change.

Results go to `out_dir`: `methods/<name>.json` per finished method, `results.json` for the whole
table, `generations/<name>.jsonl` (open-ended replies with verdicts) and `ab_generations/<name>.jsonl`.
A rerun skips methods already finished with the same settings, and `PendingSetup` defers fitting
so a resumed run does not fit them again either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from finesteer.data.items import ABItem, OpenEndedItem
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.errors import EvaluationError
from finesteer.evaluate.judges import (
    CAA_BEHAVIOUR_0_10,
    HSI_COORDINATION_0_5,
    JudgeConfigError,
    LLMJudge,
    LocalModelJudge,
    Rubric,
    resolve_endpoint,
)
from finesteer.evaluate.verdict import Judge
from finesteer.generation import GenerationConfig
from finesteer.interventions.edit import Intervention
from finesteer.paths import write_json
from finesteer.scoring.forward import applied, intervention_digest, log_probs_at

if TYPE_CHECKING:
    from rich.table import Table

    from finesteer.models.loading import LoadedModel

JudgeKind = Literal["auto", "llm", "local", "none"]
JUDGE_KINDS: tuple[str, ...] = ("auto", "llm", "local", "none")
DEFAULT_LOCAL_JUDGE = "qwen2.5-coder-0.5b-instruct"
COORDINATION_BEHAVIOURS: tuple[str, ...] = ("coordinate-other-ais", "hsi-coordination")
RESULT_VERSION = 1


class ComparisonError(ValueError):
    """A comparison that cannot run or resume (no setups, duplicate names, other settings in out_dir)."""


@dataclass
class SteeringSetup:
    """One method ready to evaluate: a model, and optionally an intervention and a system prompt."""

    name: str
    lm: LoadedModel
    intervention: Intervention | None = None
    system_prompt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        """What makes two setups the same for resuming: weights, intervention, system prompt."""
        return {
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            "intervention": intervention_digest(self.intervention),
            "system_prompt": self.system_prompt,
        }


@dataclass(frozen=True)
class PendingSetup:
    """A setup built (fitted) only if its method has not already finished in the output folder.

    `key` describes the method's settings; a finished result made with another key is refused.
    """

    name: str
    build: Callable[[], SteeringSetup]
    key: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareSettings:
    """Evaluation settings shared by every method (greedy decoding by default)."""

    open_ended: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    ab_generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32))
    ab_prompt_style: Literal["hsi", "caa"] = "hsi"
    batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {
            "open_ended": asdict(self.open_ended),
            "ab_generation": asdict(self.ab_generation),
            "ab_prompt_style": self.ab_prompt_style,
            "batch_size": self.batch_size,
        }


# --- judges ---------------------------------------------------------------------------------------


def behaviour_rubric(behaviour: str) -> Rubric:
    """HSI's 0–5 coordination rubric for AI coordination, CAA's 0–10 rubric for the other behaviours."""
    if behaviour in COORDINATION_BEHAVIOURS:
        return HSI_COORDINATION_0_5
    rubric = CAA_BEHAVIOUR_0_10.get(behaviour)
    if rubric is None:
        known = ", ".join([*COORDINATION_BEHAVIOURS, *CAA_BEHAVIOUR_0_10])
        raise ComparisonError(f"no open-ended judge rubric for behaviour '{behaviour}' (known: {known})")
    return rubric


def local_judge_generate(
    judge_lm: LoadedModel, *, max_new_tokens: int = 8, batch_size: int = 8
) -> Callable[[list[tuple[str, str]]], list[str]]:
    """A `LocalModelJudge` transport: chat-format each (system, user) pair and decode greedily."""
    from finesteer.generation import generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)

    def complete(messages: list[tuple[str, str]]) -> list[str]:
        prompts = [chat_prompt(judge_lm.tokenizer, user, system=system) for system, user in messages]
        return generate(judge_lm, prompts, config)

    return complete


def local_judge_expected_score(
    judge_lm: LoadedModel, rubric: Rubric, *, batch_size: int = 8, min_mass: float = 0.5
) -> Callable[[list[tuple[str, str]]], list[str]] | None:
    """A `LocalModelJudge` transport that answers with the judge's *expected* score.

    For an integer scale whose labels are single tokens (HSI's 0–5), the next-token probabilities
    of the labels after the chat prompt give E[score] = Σ v·p(v) (renormalised over the labels),
    returned as text for the rubric to parse. A small judge's greedy answer is nearly constant
    (Qwen2.5-0.5B says "4" to almost anything); the expectation keeps its ordering. When the labels
    carry less than `min_mass` of the probability the reply is left unparsable (no score).
    None when the scale does not fit (non-integer bounds, multi-token labels such as "10").
    """
    low, high = rubric.low, rubric.high
    if rubric.kind != "scale" or low != int(low) or high != int(high):
        return None
    values = list(range(int(low), int(high) + 1))
    tokenizer = judge_lm.tokenizer
    ids = [tokenizer(str(v), add_special_tokens=False)["input_ids"] for v in values]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        return None
    label_ids = [i[0] for i in ids]

    def complete(messages: list[tuple[str, str]]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(messages), batch_size):
            chunk = messages[start : start + batch_size]
            seqs = [_ids(judge_lm, chat_prompt(tokenizer, user, system=system)) for system, user in chunk]
            logp = log_probs_at(judge_lm, seqs, [[len(s) - 1] for s in seqs])[:, 0].double()
            probs = logp[:, label_ids].exp()
            for row in probs:
                mass = float(row.sum())
                if mass < min_mass:
                    replies.append(f"no score: the labels hold only {mass:.2f} of the probability")
                    continue
                expected = sum(v * float(p) for v, p in zip(values, row / mass, strict=True))
                replies.append(f"{expected:.4f}")
        return replies

    return complete


def make_judge(
    behaviour: str,
    kind: JudgeKind = "auto",
    *,
    local_model: str = DEFAULT_LOCAL_JUDGE,
    env: Mapping[str, str] | None = None,
) -> tuple[Judge | None, str]:
    """The open-ended judge and a description of it for the results.

    auto: an OpenAI-compatible endpoint when `FINESTEER_JUDGE_BASE_URL` (or `OPENAI_BASE_URL`) and
    `FINESTEER_JUDGE_MODEL` are set, else the local model. llm: the endpoint, or an error naming
    what is missing. local: `local_model` (a registry name) on the same rubric, scored by its
    expected label (`local_judge_expected_score`) where the scale allows, else greedily; a 0.5B
    judge is far weaker than the GPT-4-class judges of the papers. none: no judge.
    """
    if kind not in JUDGE_KINDS:
        raise ComparisonError(f"unknown judge '{kind}'; choose one of {', '.join(JUDGE_KINDS)}")
    if kind == "none":
        return None, "none"
    rubric = behaviour_rubric(behaviour)
    env = os.environ if env is None else env
    if kind in ("auto", "llm"):
        try:
            endpoint = resolve_endpoint(env=env)
        except JudgeConfigError:
            if kind == "llm":
                raise
        else:
            # HSI's judge protocol: 5 samples at T=1, averaged; CAA's: one reply at T=0.
            samples = 5 if rubric is HSI_COORDINATION_0_5 else 1
            judge = LLMJudge(rubric, env=env, n_samples=samples)
            return judge, f"llm:{endpoint.model} ({rubric.name}, n={samples})"
    from finesteer.models.loading import load_model

    judge_lm = load_model(local_model)
    expected = local_judge_expected_score(judge_lm, rubric)
    if expected is not None:
        judge = LocalModelJudge(expected, rubric, max_parse_retries=0)
        return judge, f"local:{local_model} ({rubric.name}, expected score over label tokens)"
    judge = LocalModelJudge(local_judge_generate(judge_lm), rubric, max_parse_retries=0)
    return judge, f"local:{local_model} ({rubric.name}, greedy)"


# --- measurements ---------------------------------------------------------------------------------


def next_token_kl_between(
    reference: LoadedModel,
    setup: SteeringSetup,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """KL(p_reference ‖ p_setup) of the next token after each harmless user prompt, in nats.

    The reference sees the plain chat prompt; the setup sees it with its system prompt, through its
    own weights and intervention. For a same-model intervention this is
    `finesteer.evaluate.helpfulness.next_token_kl`.
    """
    if not prompts:
        raise EvaluationError("no harmless prompts for the KL")
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        base_seqs = [_ids(reference, chat_prompt(reference.tokenizer, p)) for p in chunk]
        seqs = [_ids(setup.lm, chat_prompt(setup.lm.tokenizer, p, system=setup.system_prompt)) for p in chunk]
        base = log_probs_at(reference, base_seqs, [[len(s) - 1] for s in base_seqs])[:, 0].double()
        with applied(setup.lm, setup.intervention):
            steered = log_probs_at(setup.lm, seqs, [[len(s) - 1] for s in seqs])[:, 0].double()
        if base.shape != steered.shape:
            raise EvaluationError("the setup's vocabulary differs from the reference model's; KL undefined")
        kl = (base.exp() * (base - steered)).sum(dim=-1)
        values += [max(0.0, float(v)) for v in kl]
    return values


def _ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def evaluate_setup(
    setup: SteeringSetup,
    *,
    reference: LoadedModel,
    ab_items: Sequence[ABItem],
    open_ended_items: Sequence[OpenEndedItem],
    harmless_prompts: Sequence[str],
    judge: Judge | None,
    settings: CompareSettings,
    out_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """All measurements of one setup, as a JSON-ready dict."""
    from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
    from finesteer.evaluate.harness import run_generations
    from finesteer.evaluate.scores import mean_std
    from finesteer.evaluate.text import fluency
    from finesteer.scoring.ab import ABPrompt

    started = time.perf_counter()
    lm, iv, system = setup.lm, setup.intervention, setup.system_prompt
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
    if out_dir is not None:
        _write_jsonl(out_dir / "ab_generations" / f"{setup.name}.jsonl", gen.per_item)
    if open_ended_items:
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
        responses = [row["response"] for row in rows]
        result["fluency"] = _finite(fluency(responses))
        result["open_ended_n"] = len(rows)
        if judge is not None:
            stats = mean_std([row["verdicts"]["judge"]["score"] for row in rows])
            result.update(
                open_ended_score=_finite(stats.mean),
                open_ended_std=_finite(stats.std),
                open_ended_n_unscored=stats.n_missing,
            )
        else:
            result.update(open_ended_score=None, open_ended_std=None, open_ended_n_unscored=len(rows))
    else:
        result.update(fluency=None, open_ended_n=0, open_ended_score=None, open_ended_std=None)
    if harmless_prompts:
        kl = next_token_kl_between(reference, setup, harmless_prompts, batch_size=settings.batch_size)
        result.update(kl_harmless=float(sum(kl) / len(kl)), kl_harmless_max=max(kl), kl_n=len(kl))
    else:
        result.update(kl_harmless=None, kl_harmless_max=None, kl_n=0)
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    result["system_prompt"] = system
    result["model"] = lm.name
    result["n_edits"] = len(iv) if iv is not None else 0
    result["fit"] = setup.metadata
    return result


# --- the comparison -------------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    """Per-method results (in run order) plus what was compared how."""

    methods: dict[str, dict[str, Any]]
    judge: str
    info: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "judge": self.judge,
            "methods": self.methods,
            "out_dir": str(self.out_dir) if self.out_dir is not None else None,
        }

    def table(self, title: str | None = None) -> Table:
        from rich.table import Table

        table = Table(title=title or f"{self.info.get('model', '')} · {self.info.get('data', '')}")
        columns = (
            "method",
            "A/B match (prob)",
            "p(match)",
            "A/B match (gen)",
            "open-ended",
            "fluency",
            "KL harmless",
        )
        for column in columns:
            table.add_column(column, justify="left" if column == "method" else "right")

        def num(value: Any, digits: int = 2) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        for name, row in self.methods.items():
            open_ended = num(row.get("open_ended_score"))
            if row.get("open_ended_std") is not None:
                open_ended += f" ± {row['open_ended_std']:.2f}"
            generated = num(row.get("ab_matching_rate_generated"))
            if row.get("ab_n_undefined"):
                generated += f" ({row['ab_n_undefined']} undef.)"
            table.add_row(
                name,
                num(row.get("ab_matching_rate")),
                num(row.get("ab_mean_p_matching")),
                generated,
                open_ended,
                num(row.get("fluency")),
                num(row.get("kl_harmless"), 3),
            )
        table.caption = f"judge: {self.judge}"
        return table


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _items_digest(
    ab_items: Sequence[ABItem], open_ended: Sequence[OpenEndedItem], harmless: Sequence[str]
) -> str:
    return _digest(
        [
            [(i.id, i.question, i.matching) for i in ab_items],
            [(i.id, i.question) for i in open_ended],
            list(harmless),
        ]
    )


def compare_setups(
    setups: Sequence[SteeringSetup | PendingSetup],
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
) -> ComparisonResult:
    """Evaluate every setup on the same items; `reference` is the unmodified model (KL baseline).

    With `out_dir`, each finished method is saved and skipped on a rerun with the same settings
    (a `PendingSetup` is then not even built); a finished method made with other settings is an
    error. `on_method(name, result, resumed)` is called after each method (for progress logs).
    """
    if not setups:
        raise ComparisonError("no setups to compare")
    names = [s.name for s in setups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ComparisonError(f"setup names must be unique; repeated: {', '.join(duplicates)}")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ComparisonError(f"setup name {name!r} cannot name a result file")
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
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        (folder / "methods").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    run_info = {**dict(info or {}), "settings": settings.to_dict(), "n_ab": len(ab_items)}
    run_info.update(n_open_ended=len(open_ended_items), n_harmless=len(harmless_prompts))
    for entry in tqdm(setups, desc="methods", disable=not progress, unit="method"):
        pending_key = dict(entry.key) if isinstance(entry, PendingSetup) else None
        path = folder / "methods" / f"{entry.name}.json" if folder is not None else None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            _check_resume(path, saved, shared_key, pending_key, entry)
            results[entry.name] = saved["result"]
            if on_method is not None:
                on_method(entry.name, saved["result"], True)
            continue
        setup = entry.build() if isinstance(entry, PendingSetup) else entry
        if setup.name != entry.name:
            raise ComparisonError(f"pending setup '{entry.name}' built a setup named '{setup.name}'")
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
        )
        results[entry.name] = result
        if path is not None:
            record = {
                "shared_key": shared_key,
                "pending_key": pending_key,
                "setup_key": setup.key(),
                "result": result,
            }
            write_json(path, record, indent=1)
        del setup
        if on_method is not None:
            on_method(entry.name, result, False)
    comparison = ComparisonResult(results, judge_desc, run_info, folder)
    if folder is not None:
        (folder / "results.json").write_text(
            json.dumps(comparison.to_json(), indent=1, default=str) + "\n", encoding="utf-8"
        )
    return comparison


def _check_resume(
    path: Path,
    saved: Mapping[str, Any],
    shared_key: Mapping[str, Any],
    pending_key: Mapping[str, Any] | None,
    entry: SteeringSetup | PendingSetup,
) -> None:
    """Refuse to reuse a finished method whose items, settings, judge or method settings differ."""

    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    old_shared = saved.get("shared_key", {})
    problems = [k for k in shared_key if not same(old_shared.get(k), shared_key[k])]
    if pending_key is not None and not same(saved.get("pending_key"), pending_key):
        problems.append("method settings")
    if isinstance(entry, SteeringSetup) and saved.get("setup_key") != entry.key():
        problems.append("setup (weights, intervention or system prompt)")
    if problems:
        raise ComparisonError(
            f"{path} was made with other {', '.join(problems)}; use another --out folder or delete the file "
            "to evaluate this method again"
        )


__all__ = [
    "DEFAULT_LOCAL_JUDGE",
    "JUDGE_KINDS",
    "CompareSettings",
    "ComparisonError",
    "ComparisonResult",
    "PendingSetup",
    "SteeringSetup",
    "behaviour_rubric",
    "compare_setups",
    "evaluate_setup",
    "local_judge_expected_score",
    "local_judge_generate",
    "make_judge",
    "next_token_kl_between",
]
