"""`finesteer eval ab|asr|helpfulness`: measure behaviour and ability, with or without an intervention."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from finesteer.cli.apps import eval_app
from finesteer.cli.common import emit_json, run_command, stderr_console

if TYPE_CHECKING:
    from finesteer.interventions.edit import Intervention
    from finesteer.models.loading import LoadedModel

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ModelArg = Annotated[str, typer.Argument(help="Registry name, tiny-* name, HF folder, .gguf file or hub id.")]
InterventionOpt = Annotated[
    Path | None, typer.Option("--intervention", "-i", help="Artifact folder to apply during the evaluation.")
]
LimitOpt = Annotated[int | None, typer.Option(help="Evaluate only the first N items.")]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split (default: the dataset's default split).")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward / generation batch.")]
OtherWeightsOpt = Annotated[
    bool, typer.Option(help="Apply an artifact fitted on other weights of the same shape.")
]

AB_METHODS = ("prob", "generate", "both")
ASR_JUDGES = ("keyword", "gcg", "llm")


def _load(
    model: str, intervention: Path | None, allow_other_weights: bool
) -> tuple[LoadedModel, Intervention | None]:
    from finesteer.artifacts import load_intervention
    from finesteer.models import load_model

    artifact = load_intervention(intervention) if intervention else None
    lm = load_model(model)
    if artifact is None:
        return lm, None
    artifact.check_model(lm, strict=not allow_other_weights)
    return lm, artifact.intervention


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, _fmt(value))
    Console().print(table)


@eval_app.command("ab")
def ab(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="A/B dataset name (e.g. coordinate-other-ais) or file.")],
    split: SplitOpt = None,
    limit: LimitOpt = None,
    intervention: InterventionOpt = None,
    method: Annotated[str, typer.Option(help="prob (letter probability), generate, or both.")] = "both",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generated answer.")] = 64,
    prompt_style: Annotated[
        str, typer.Option(help="Generated answers: hsi (answer-format instruction) or caa ('(' pre-filled).")
    ] = "hsi",
    system: SystemOpt = None,
    balanced: Annotated[
        bool,
        typer.Option(
            "--balanced",
            help="Score every item in both option orders, so a pure A/B letter bias scores 0.5.",
        ),
    ] = False,
    batch_size: BatchOpt = 8,
    allow_other_weights: OtherWeightsOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """A/B behaviour rate: letter probability (CAA) and/or parsed generated answers (HSI)."""
    from finesteer.data import load_dataset
    from finesteer.data.items import ABItem
    from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
    from finesteer.generation import GenerationConfig
    from finesteer.scoring.ab import PROMPT_STYLES, ABPrompt

    def work() -> dict[str, Any]:
        _choice(method, AB_METHODS, "--method")
        _choice(prompt_style, PROMPT_STYLES, "--prompt-style")
        items = load_dataset(data, split, limit, kind="ab" if _is_file(data) else None)
        if not items:
            raise ValueError(f"dataset {data!r} (split {split or 'default'}) has no items")
        if not all(isinstance(item, ABItem) for item in items):
            raise ValueError(f"dataset {data!r} split {split or 'default'} is not an A/B set")
        if balanced:
            from finesteer.data.balance import letter_balanced

            items = letter_balanced(items)  # type: ignore[arg-type]
        lm, iv = _load(model, intervention, allow_other_weights)
        log = stderr_console()
        log.print(f"A/B evaluation of {model} on {data} ({len(items)} items, method {method})")
        result: dict[str, Any] = {
            "model": model,
            "data": data,
            "split": split,
            "intervention": str(intervention or ""),
            "n": len(items),
            "letter_balanced": balanced,
            "matching_rate_prob": None,
            "mean_p_matching": None,
            "matching_rate_generated": None,
            "n_undefined": None,
        }
        if method in ("prob", "both"):
            prob = ab_matching_rate_prob(
                lm, items, prompt=ABPrompt(system), intervention=iv, batch_size=batch_size, progress=True
            )
            result.update(matching_rate_prob=prob.matching_rate, mean_p_matching=prob.mean_p_matching)
            result["prob"] = prob.to_dict()
        if method in ("generate", "both"):
            config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
            gen = ab_matching_rate_generated(
                lm,
                items,
                system=system,
                intervention=iv,
                config=config,
                prompt_style=prompt_style,  # type: ignore[arg-type]
                progress=True,
            )
            result.update(matching_rate_generated=gen.matching_rate, n_undefined=gen.n_undefined)
            result["generated"] = gen.to_dict()
        return result

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    _print_table(
        f"A/B {data}: {model}" + (f" + {intervention}" if intervention else ""),
        [
            ("n", result["n"]),
            ("matching rate (letter probability)", result["matching_rate_prob"]),
            ("mean p(matching)", result["mean_p_matching"]),
            ("matching rate (generated)", result["matching_rate_generated"]),
            ("undefined generated answers", result["n_undefined"]),
        ],
    )


def _is_file(data: str) -> bool:
    return data.lower().endswith((".jsonl", ".json", ".csv")) or "/" in data


@eval_app.command("asr")
def asr(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="Harmful prompt set (e.g. jailbreakbench, advbench) or file.")],
    split: SplitOpt = None,
    limit: LimitOpt = None,
    intervention: InterventionOpt = None,
    judge: Annotated[
        str,
        typer.Option(
            help="keyword (Ships list + short/repetitive filters), gcg (GCG/AdvBench prefixes), or llm "
            "(harmfulness rubric on an OpenAI-compatible endpoint from FINESTEER_JUDGE_* variables)."
        ),
    ] = "keyword",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for generations.jsonl (streamed; a re-run resumes where it stopped)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per response.")] = 64,
    system: SystemOpt = None,
    batch_size: BatchOpt = 8,
    allow_other_weights: OtherWeightsOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """Attack success rate and refusal rate on harmful prompts (chat template, greedy)."""
    from finesteer.data import load_dataset
    from finesteer.data.items import ABItem
    from finesteer.data.prompts import chat_prompt
    from finesteer.evaluate.harness import run_generations
    from finesteer.evaluate.judges import HARMFULNESS, KeywordRefusalJudge, LLMJudge
    from finesteer.evaluate.scores import attack_success_rate, refusal_rate
    from finesteer.generation import GenerationConfig

    def work() -> dict[str, Any]:
        _choice(judge, ASR_JUDGES, "--judge")
        items = load_dataset(data, split, limit, kind="prompts" if _is_file(data) else None)
        if not items:
            raise ValueError(f"dataset {data!r} (split {split or 'default'}) has no items")
        if any(isinstance(item, ABItem) for item in items):
            raise ValueError(f"dataset {data!r} is an A/B set; use `finesteer eval ab` for it")
        keyword = KeywordRefusalJudge.gcg() if judge == "gcg" else KeywordRefusalJudge.ships()
        judges: dict[str, Any] = {"keyword": keyword}
        if judge == "llm":
            judges["llm"] = LLMJudge(HARMFULNESS)
        lm, iv = _load(model, intervention, allow_other_weights)
        stderr_console().print(f"ASR of {model} on {data}: {len(items)} prompts, judge {judge}")
        out_path = out / "generations.jsonl" if out is not None else None
        rows = run_generations(
            lm,
            items,
            out_path,
            format_fn=lambda text: chat_prompt(lm.tokenizer, text, system),
            config=GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size),
            intervention=iv,
            judges=judges,
            progress=True,
        )
        asr_key = "llm" if judge == "llm" else "keyword"
        success = attack_success_rate(row["verdicts"][asr_key]["score"] for row in rows)
        refusals = refusal_rate(row["verdicts"]["keyword"]["label"] == "refusal" for row in rows)
        return {
            "model": model,
            "data": data,
            "split": split,
            "intervention": str(intervention or ""),
            "judge": judge,
            "n": len(rows),
            "asr": success.rate,
            "asr_count": success.count,
            "asr_ci95": list(success.interval()),
            "asr_n_missing": success.n_missing,
            "refusal_rate": refusals.rate,
            "refusal_count": refusals.count,
            "refusal_ci95": list(refusals.interval()),
            "refusal_judge": "gcg" if judge == "gcg" else "keyword",
            "jsonl": str(out_path) if out_path is not None else None,
            "records": rows,
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    _print_table(
        f"ASR {data}: {model}" + (f" + {intervention}" if intervention else ""),
        [
            ("n", result["n"]),
            (f"attack success rate ({judge})", result["asr"]),
            ("refusal rate (keywords)", result["refusal_rate"]),
            ("generations", result["jsonl"] or "(not saved: pass --out)"),
        ],
    )


@eval_app.command("helpfulness")
def helpfulness(
    model: ModelArg,
    intervention: InterventionOpt = None,
    limit: LimitOpt = None,
    mc_data: Annotated[str, typer.Option(help="Multiple-choice set (A/B format).")] = "finesteer-mc",
    text_data: Annotated[
        str, typer.Option(help="Harmless prompts for perplexity (raw text) and KL (chat template).")
    ] = "jailbreakbench-benign",
    batch_size: BatchOpt = 8,
    allow_other_weights: OtherWeightsOpt = False,
    json_out: JsonFlag = False,
) -> None:
    """MC accuracy, perplexity on harmless text and next-token KL, with and without an intervention."""
    from finesteer.data import load_dataset
    from finesteer.data.items import ABItem
    from finesteer.data.prompts import chat_prompt
    from finesteer.evaluate.harness import item_text
    from finesteer.evaluate.helpfulness import evaluate_helpfulness

    def work() -> dict[str, Any]:
        mc_items = load_dataset(mc_data, None, limit)
        if not mc_items or not all(isinstance(item, ABItem) for item in mc_items):
            raise ValueError(f"--mc-data {mc_data!r} must be a non-empty multiple-choice (A/B format) set")
        text_items = load_dataset(text_data, None, limit)
        if not text_items:
            raise ValueError(f"--text-data {text_data!r} has no items")
        texts = [item_text(item) for item in text_items]
        lm, iv = _load(model, intervention, allow_other_weights)
        stderr_console().print(
            f"helpfulness of {model}: {len(mc_items)} MC questions, {len(texts)} harmless texts"
        )
        report = evaluate_helpfulness(
            lm,
            iv,
            mc_items=mc_items,
            texts=texts,
            kl_prompts=[chat_prompt(lm.tokenizer, text) for text in texts],
            batch_size=batch_size,
            progress=True,
        )
        current = report["intervened"] or report["base"]
        return {
            "model": model,
            "intervention": str(intervention or ""),
            "mc_data": mc_data,
            "text_data": text_data,
            "n": report["n_mc"],
            "mc_accuracy": current["mc_accuracy"],
            "mc_accuracy_base": report["base"]["mc_accuracy"],
            "perplexity": current["perplexity"],
            "perplexity_base": report["base"]["perplexity"],
            "kl_mean": report["kl_mean"],
            "kl_max": report["kl_max"],
            **{
                k: report[k]
                for k in ("n_texts", "n_tokens", "n_kl_prompts", "base", "intervened", "per_item")
            },
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    _print_table(
        f"helpfulness: {model}" + (f" + {intervention}" if intervention else ""),
        [
            ("MC questions", result["n"]),
            ("MC accuracy (log-likelihood)", result["mc_accuracy"]),
            ("MC accuracy without intervention", result["mc_accuracy_base"]),
            ("perplexity", result["perplexity"]),
            ("perplexity without intervention", result["perplexity_base"]),
            ("next-token KL mean (nats)", result["kl_mean"]),
            ("next-token KL max (nats)", result["kl_max"]),
        ],
    )
