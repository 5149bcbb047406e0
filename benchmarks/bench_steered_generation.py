"""Steered generation speed: plain HF `generate` vs the same under a 4-head HSI intervention applied by
finesteer and by nnsight (scope "last": the last prompt token at prefill, then every new token).

    python benchmarks/bench_steered_generation.py --model smollm2-135m-instruct --tokens 32 --repeats 3
    python benchmarks/bench_steered_generation.py --json

Columns: wall seconds, tokens/s and ratio to plain generation; the same from process CPU time (with
`--threads 1` that is the compute itself, robust to other jobs on a shared machine). Every row
generates exactly `--tokens` new tokens per prompt (greedy, min = max new tokens, so a
steered run cannot stop early), batch 1 and batch 8 (left padding, as `finesteer.generate` does).
finesteer's row is `lm.model.generate` inside `finesteer.intervene`, which is what
`finesteer.generation.generate` runs. Repeats are interleaved across methods so a shared machine's
load drifts onto every method alike; the median is reported. "same tokens" says whether the steered
tokens equal finesteer's (nnsight must produce the same text for the same edit).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _bench import load_note, log, print_table
from torch import Tensor

from finesteer.data import load_dataset
from finesteer.data.prompts import chat_prompt
from finesteer.interventions import Intervention, intervene, steer_head
from finesteer.models import LoadedModel, load_model

COLUMNS = (
    "model",
    "method",
    "batch",
    "seconds",
    "tokens_per_s",
    "speedup",
    "cpu_seconds",
    "cpu_tokens_per_s",
    "cpu_speedup",
    "same_tokens",
    "note",
)


def steered_heads(lm: LoadedModel) -> list[tuple[int, int]]:
    """Four heads in the middle layers (where HSI's heads sit), the same for every run of a model."""
    layers = lm.info.n_layers
    return [(int(layers * f), h % lm.info.n_heads) for f, h in ((0.35, 0), (0.45, 3), (0.55, 5), (0.65, 2))]


def _inputs(lm: LoadedModel, prompts: list[str]) -> dict[str, Tensor]:
    return dict(
        lm.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
    )


def _hf_generate(lm: LoadedModel, inputs: dict[str, Tensor], tokens: int) -> Tensor:
    with torch.no_grad():
        out = lm.model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return out[:, inputs["input_ids"].shape[1] :]


def _vectors(lm: LoadedModel, scale: float) -> list[tuple[int, int, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for layer, head in steered_heads(lm):
        vector = torch.randn(lm.info.head_dim, generator=generator)
        out.append((layer, head, scale * vector / vector.norm()))
    return out


def methods(
    lm: LoadedModel, vectors: list[tuple[int, int, Tensor]], tokens: int, use_nnsight: bool
) -> dict[str, Callable[[dict[str, Tensor]], Tensor]]:
    steering = Intervention()
    for layer, head, vector in vectors:
        steering = steering + steer_head(layer, head, vector, 1.0, scope="last")

    def plain(inputs: dict[str, Tensor]) -> Tensor:
        return _hf_generate(lm, inputs, tokens)

    def finesteer_steered(inputs: dict[str, Tensor]) -> Tensor:
        with intervene(lm, steering):
            return _hf_generate(lm, inputs, tokens)

    table = {"plain HF generate": plain, "finesteer steered": finesteer_steered}
    if use_nnsight:
        from nnsight import LanguageModel

        nn_model = LanguageModel(copy.deepcopy(lm.model), tokenizer=lm.tokenizer)  # its own copy
        head_dim = lm.info.head_dim

        def nnsight_steered(inputs: dict[str, Tensor]) -> Tensor:
            width = inputs["input_ids"].shape[1]
            with (
                torch.no_grad(),
                nn_model.generate(
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=lm.tokenizer.pad_token_id,
                ) as tracer,
            ):
                with tracer.invoke(inputs):
                    for _ in tracer.all():  # every forward: the prefill, then each new token
                        for layer, head, vector in vectors:
                            o_proj = nn_model.model.layers[layer].self_attn.o_proj
                            o_proj.input[:, -1, head * head_dim : (head + 1) * head_dim] += vector
                with tracer.invoke():  # reads after an open all() loop go in their own invoke
                    ids = tracer.result.save()
            return ids[:, width:]

        table["nnsight steered"] = nnsight_steered
    return table


def bench_model(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    lm = load_model(name)
    queries = [item.prompt for item in load_dataset(args.data, limit=8)]
    prompts = [chat_prompt(lm.tokenizer, q) for q in queries]
    vectors = _vectors(lm, args.scale)
    table = methods(lm, vectors, args.tokens, not args.skip_nnsight)
    rows: list[dict[str, Any]] = []
    heads = ", ".join(f"{layer}.{head}" for layer, head in steered_heads(lm))
    for batch in (1, 8):
        inputs = _inputs(lm, prompts[:batch])
        log(f"{name} batch {batch}: {load_note()}")
        times: dict[str, list[float]] = {m: [] for m in table}
        cpu: dict[str, list[float]] = {m: [] for m in table}
        outputs: dict[str, Tensor] = {}
        for method, fn in table.items():  # warm-up, and the tokens to compare
            outputs[method] = fn(inputs)
        for _ in range(args.repeats):
            for method, fn in table.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                fn(inputs)
                times[method].append(time.perf_counter() - started)
                cpu[method].append(time.process_time() - started_cpu)
        plain_seconds = statistics.median(times["plain HF generate"])
        plain_cpu = statistics.median(cpu["plain HF generate"])
        for method in table:
            seconds, cpu_seconds = statistics.median(times[method]), statistics.median(cpu[method])
            same = (
                None
                if method == "plain HF generate"
                else bool(torch.equal(outputs[method], outputs["finesteer steered"]))
            )
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "batch": batch,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(batch * args.tokens / seconds, 2),
                    "speedup": round(plain_seconds / seconds, 3),
                    "cpu_seconds": round(cpu_seconds, 3),
                    "cpu_tokens_per_s": round(batch * args.tokens / cpu_seconds, 2),
                    "cpu_speedup": round(plain_cpu / cpu_seconds, 3),
                    "max_abs_diff": None,
                    "top10_overlap": None,
                    "same_tokens": same,
                    "note": f"heads {heads}; wall runs "
                    + ", ".join(f"{t:.2f}" for t in times[method])
                    + " s",
                }
            )
            log(f"  {method}: {seconds:.2f} s, cpu {cpu_seconds:.2f} s")
        steered_changed = not torch.equal(outputs["plain HF generate"], outputs["finesteer steered"])
        rows[-len(table)]["note"] += f"; steering changed the tokens: {steered_changed}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="Registry model (repeatable); default smollm2.")
    parser.add_argument("--data", default="alpaca")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--scale", type=float, default=8.0, help="Norm of each head's steering vector.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-nnsight", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a busy shared CPU."
    )
    parser.add_argument("--json", action="store_true", help="Print the table as JSON records.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.tokens < 1:
        parser.error("--repeats and --tokens must be ≥ 1")
    rows = [row for name in args.model or ["smollm2-135m-instruct"] for row in bench_model(args, name)]
    title = (
        f"Steered generation, 4 mid-layer heads (scope last, vector norm {args.scale:g}), "
        f"{args.tokens} new tokens; median of {args.repeats} interleaved runs, torch threads "
        f"{torch.get_num_threads()}, {load_note()}"
    )
    print_table(title, rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()
