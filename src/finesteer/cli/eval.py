"""`finesteer eval ab|asr|helpfulness|sta-refusal`: behaviour and ability, with or without an intervention."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import eval_app
from finesteer.cli.common import (
    emit_json,
    load_with_intervention,
    output_folder,
    print_rows,
    run_command,
    stderr_console,
)
from finesteer.cli.options import (
    ActorsOpt,
    BackendOpt,
    BatchOpt,
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    EvalDataOpt,
    InterventionOpt,
    JsonFlag,
    LimitOpt,
    ModelArg,
    NumCpusOpt,
    NumGpusOpt,
    OtherWeightsOpt,
    RayAddressOpt,
    SplitOpt,
    SystemOpt,
    check_choice,
    data_source,
)

AB_METHODS = ("prob", "generate", "both")
ASR_JUDGES = ("keyword", "gcg", "llm")


def run_refusal(model: str, sae: Path, out: Path, **settings: Any) -> dict[str, Any]:
    """The refusal experiment (`finesteer.recipes.refusal.refusal_comparison`), its table logged on stderr."""
    from finesteer.recipes.refusal import RefusalExperiment, markdown_table, refusal_comparison

    payload = refusal_comparison(model, sae, out, RefusalExperiment.from_options(**settings))
    stderr_console().print(markdown_table(payload), highlight=False, markup=False)
    return payload


@eval_app.command("ab")
def ab(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="A/B dataset name (e.g. coordinate-other-ais) or file.")],
    columns: ColumnsOpt = None,
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
            "--balanced/--single-order",
            help="Score every item in both option orders, so a pure A/B letter bias scores 0.5; default. "
            "--single-order scores each item once, as written.",
        ),
    ] = True,
    batch_size: BatchOpt = 8,
    allow_other_weights: OtherWeightsOpt = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    eval_data: EvalDataOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """A/B behaviour rate: letter probability (CAA) and/or parsed generated answers (HSI)."""
    from finesteer.data.balance import letter_balanced
    from finesteer.data.typed import load_ab_set
    from finesteer.evaluate.ab_effect import ab_rates
    from finesteer.evaluate.eval_sets import load_eval_sets, score_eval_sets
    from finesteer.generation import GenerationConfig
    from finesteer.scoring.ab import PROMPT_STYLES

    def work() -> dict[str, Any]:
        check_choice(method, AB_METHODS, "--method")
        check_choice(prompt_style, PROMPT_STYLES, "--prompt-style")
        GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)  # checked before loading
        items = load_ab_set(data_source(data, columns, "ab"), split, limit)
        if balanced:
            items = letter_balanced(items)
        extra = load_eval_sets(eval_data or [], balanced=balanced)  # validated before the model loads
        lm, iv = load_with_intervention(model, intervention, allow_other_weights, device=device, dtype=dtype)
        stderr_console().print(f"A/B evaluation of {model} on {data} ({len(items)} items, method {method})")
        settings: dict[str, Any] = dict(
            method=method,
            system=system,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt_style=prompt_style,
        )
        rates = ab_rates(lm, items, iv, **settings)
        more = {"eval_sets": score_eval_sets(lm, extra, iv, **settings)} if extra else {}
        return {
            "model": model,
            "data": data,
            "split": split,
            "intervention": str(intervention or ""),
            "n": len(items),
            "letter_balanced": balanced,
            **rates,
            **more,
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    _print_eval_sets(result)
    print_rows(
        f"A/B {data}: {model}" + (f" + {intervention}" if intervention else ""),
        [
            ("n", result["n"]),
            ("matching rate (letter probability) [95% CI]", _ci(result.get("prob"), "matching_rate")),
            ("mean p(matching) [95% CI]", _ci(result.get("prob"), "mean_p_matching")),
            ("matching rate (generated) [95% CI]", _ci(result.get("generated"), "matching_rate")),
            ("undefined generated answers", result["n_undefined"]),
        ],
    )


def _print_eval_sets(result: dict[str, Any]) -> None:
    """With --eval-data: one row per test set (the main one first), before the main set's details."""
    if not result.get("eval_sets"):
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="A/B matching rate per test set")
    for column in ("test set", "n", "matching (letter prob.)", "mean p(matching)", "matching (generated)"):
        table.add_column(column)
    for row in [{"name": result["data"], **result}, *result["eval_sets"]]:
        cells = (row["matching_rate_prob"], row["mean_p_matching"], row["matching_rate_generated"])
        table.add_row(row["name"], str(row["n"]), *("–" if v is None else f"{v:.3f}" for v in cells))
    Console().print(table)


def _ci(result: dict[str, Any] | None, key: str) -> str | None:
    """"value [low, high]" of an A/B result's estimate (`interval`), None when not measured."""
    estimate = ((result or {}).get("interval") or {}).get(key) or {}
    if estimate.get("value") is None:
        return None
    if estimate.get("low") is None:
        return f"{estimate['value']:.3f}"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


@eval_app.command("asr")
def asr(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="Harmful prompt set (e.g. jailbreakbench, advbench) or file.")],
    columns: ColumnsOpt = None,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    backend: BackendOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = 2,
    num_cpus: NumCpusOpt = 1.0,
    num_gpus: NumGpusOpt = 0.0,
    json_out: JsonFlag = False,
) -> None:
    """Attack success rate and refusal rate on harmful prompts (chat template, greedy)."""
    from finesteer.cli.plans import backend_options, open_backend
    from finesteer.data.typed import load_prompt_set
    from finesteer.evaluate.asr_rate import asr_judges, asr_rates
    from finesteer.generation import GenerationConfig

    def work() -> dict[str, Any]:
        check_choice(judge, ASR_JUDGES, "--judge")
        GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)  # checked before loading
        where = backend_options(backend, ray_address, actors, num_cpus, num_gpus)
        items = load_prompt_set(data_source(data, columns, "prompts"), split, limit)
        judges = asr_judges(judge)
        with output_folder(out):  # --out checked writable and locked before the load
            lm, iv = load_with_intervention(
                model, intervention, allow_other_weights, device=device, dtype=dtype
            )
            stderr_console().print(f"ASR of {model} on {data}: {len(items)} prompts, judge {judge}")
            out_path = out / "generations.jsonl" if out is not None else None
            ray = open_backend(where, model, lm, device=device, dtype=dtype) if backend == "ray" else None
            with ray or nullcontext() as runner:
                rates = asr_rates(
                    lm,
                    items,
                    judges,
                    intervention=iv,
                    out_path=out_path,
                    system=system,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    backend=runner,
                )
            records = rates.pop("records")
            return {
                "model": model,
                "data": data,
                "split": split,
                "intervention": str(intervention or ""),
                "judge": judge,
                **rates,
                "refusal_judge": "gcg" if judge == "gcg" else "keyword",
                "jsonl": str(out_path) if out_path is not None else None,
                "records": records,
            }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    print_rows(
        f"ASR {data}: {model}" + (f" + {intervention}" if intervention else ""),
        [
            ("n", result["n"]),
            (f"attack success rate ({judge}) [95% CI]", _ci({"interval": result}, "asr_interval")),
            ("refusal rate (keywords) [95% CI]", _ci({"interval": result}, "refusal_interval")),
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """MC accuracy, perplexity on harmless text and next-token KL, with and without an intervention."""
    from finesteer.data.prompts import chat_prompt
    from finesteer.data.typed import load_ab_set, load_queries
    from finesteer.errors import check_count
    from finesteer.evaluate.helpfulness import evaluate_helpfulness

    def work() -> dict[str, Any]:
        check_count(batch_size, "--batch-size")  # before loading
        mc_items = load_ab_set(mc_data, None, limit)
        texts, _ = load_queries(text_data, None, limit)
        lm, iv = load_with_intervention(model, intervention, allow_other_weights, device=device, dtype=dtype)
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
        blind = _perplexity_blind_to(iv)
        if blind:
            stderr_console().print(f"[yellow]warning:[/] {blind}")
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
            **({"perplexity_warning": blind} if blind else {}),
            **{
                k: report[k]
                for k in ("n_texts", "n_tokens", "n_kl_prompts", "base", "intervened", "per_item")
            },
        }

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    print_rows(
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


def _perplexity_blind_to(iv: Any) -> str | None:
    """Why teacher-forced perplexity cannot see this intervention, or None: it scores every token's
    prediction inside the text, so edits only at the last position (or only on generated tokens,
    which a teacher-forced pass has none of) never change it."""
    kinds = {edit.scope.kind for edit in iv.edits} if iv is not None else set()
    if not kinds or not kinds <= {"last", "generated"}:
        return None
    return (
        f"perplexity cannot see this intervention (scope {'/'.join(sorted(kinds))}: teacher-forced "
        "perplexity never scores those positions); read the next-token KL and MC accuracy instead"
    )


@eval_app.command("sta-refusal")
def sta_refusal_command(
    model: ModelArg,
    sae: Annotated[Path, typer.Option("--sae", help="SAE folder at the layer to steer.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (resumable): results.json, table.md.")],
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of baseline, prompt, caa, sae_all, sta, sta_amplitude, "
            "sta_frequency, prompt_caa, prompt_sta."
        ),
    ] = "baseline,prompt,caa,sae_all,sta",
    lambdas: Annotated[
        str, typer.Option(help="Comma list of multipliers λ for the vector methods.")
    ] = "0.5,1,1.5,2",
    headline: Annotated[float, typer.Option(help="λ reported under `methods` in the JSON.")] = 1.0,
    trim: Annotated[float, typer.Option(help="STA trim.")] = 0.35,
    n_pairs: Annotated[
        int, typer.Option(help="Training triples (4/5 templated harmful, 1/5 CAA A/B).")
    ] = 160,
    n_harmful: Annotated[int, typer.Option(help="JailbreakBench prompts (evenly spaced).")] = 40,
    n_harmless: Annotated[int, typer.Option(help="XSTest-safe prompts (evenly spaced).")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per reply.")] = 32,
    batch_size: BatchOpt = 40,
    judge: Annotated[
        str, typer.Option(help="Keyword refusal judge: gcg+ (GCG + inability phrases), gcg, ships.")
    ] = "gcg+",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonFlag = False,
) -> None:
    """Refusal steering head to head: prompting vs CAA vs SAE-all-atoms vs STA across λ."""
    result = run_command(
        lambda: run_refusal(
            model, sae, out, methods=methods, lambdas=lambdas, headline=headline, trim=trim,
            n_pairs=n_pairs, n_harmful=n_harmful, n_harmless=n_harmless, max_new_tokens=max_new_tokens,
            batch_size=batch_size, judge=judge, device=device, dtype=dtype,
        )
    )  # fmt: skip
    if json_out:
        emit_json(result)
