"""Query-level Ships (KL, one head ablated at a time) over every head: finesteer's engines vs peers.

    python benchmarks/bench_fast_scan.py --model smollm2-135m-instruct --repeats 3 --threads 1
    python benchmarks/bench_fast_scan.py --model qwen2.5-coder-0.5b-instruct --peer-heads 24 --json

Rows (every method computes its own unablated base too; repeats are interleaved across methods so a
shared machine's load drifts onto all of them alike; medians are reported):

- raw hooks loop (a): what a user writes by hand — a torch forward hook on the head's query
  projection (ua) or o_proj input (sc), one forward of all prompts per head (right padding, logits
  read at each prompt's last token);
- nnsight / TransformerLens loop (b): the same loop written with each library, on its own copy of
  the model (a row says why when the library is missing or cannot load the model);
- finesteer simple scan (c): `scan` (one hooked forward per head);
- finesteer fast scan (d): `fast_scan` (heads × prompts batched into rows, layers before each head
  reused);
- finesteer pre-ranked (e): attribution estimate of every head, then `fast_scan` of the `--top-n`
  best (`pre_ranked_scan`).

Columns: wall seconds and speed-up over (a); process CPU seconds and CPU speed-up (with `--threads
1` the CPU time is the compute itself, far less sensitive to other jobs on a shared machine than
wall time); max |score difference| from (a) (pre-ranked: over its verified heads); how many of its
top-10 heads are (a)'s top 10. `--peer-heads N` times (b) and (c) on N evenly spread heads and
scales their seconds to all heads (their top-10 overlap is then not available).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _bench import load_note, log, print_table
from torch import Tensor

from finesteer.data import load_dataset
from finesteer.locate.attribution.metrics import KLDivergence
from finesteer.locate.attribution.prerank import PreRankedScan, pre_ranked_scan
from finesteer.locate.engine import EncodedPrompts, encode_prompts
from finesteer.locate.fast_scan import fast_scan
from finesteer.locate.rank_stats import spearman
from finesteer.locate.scan import KLFromBase, LastLogits, scan
from finesteer.locate.ships import ablation, all_heads, format_queries
from finesteer.models import LoadedModel, load_model
from finesteer.sites import Head

COLUMNS = (
    "model",
    "method",
    "seconds",
    "speedup",
    "cpu_seconds",
    "cpu_speedup",
    "max_abs_diff",
    "top10_overlap",
    "note",
)


def _right_padded(lm: LoadedModel, encoded: EncodedPrompts) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(ids) for ids in encoded.ids)
    input_ids = torch.full((len(encoded), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded.ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask, mask.sum(1) - 1


def _kl(base: Tensor, logits: Tensor) -> Tensor:
    p = torch.log_softmax(base.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def _table(info: Any) -> Tensor:
    return torch.full((info.n_layers, info.n_heads), math.nan)


def raw_hooks_loop(
    lm: LoadedModel, encoded: EncodedPrompts, mode: str, eps: float, heads: list[Head]
) -> Tensor:
    """The hand-written baseline: torch hooks only, no finesteer machinery. [L, H], NaN where unscanned."""
    model, info = lm.model, lm.info
    input_ids, mask, last = _right_padded(lm, encoded)
    rows = torch.arange(len(last))

    def forward() -> Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask).logits[rows, last]

    base = forward()
    table = _table(info)
    for layer, head in heads:
        attn = model.model.layers[layer].self_attn
        cols = slice(head * info.head_dim, (head + 1) * info.head_dim)

        def scale_output(mod: Any, args: Any, out: Tensor, cols: slice = cols) -> Tensor:
            out = out.clone()
            out[..., cols] *= eps
            return out

        def scale_input(mod: Any, args: Any, cols: slice = cols) -> tuple[Tensor]:
            x = args[0].clone()
            x[..., cols] *= eps
            return (x,)

        handle = (
            attn.q_proj.register_forward_hook(scale_output)
            if mode == "ua"
            else attn.o_proj.register_forward_pre_hook(scale_input)
        )
        try:
            table[layer, head] = _kl(base, forward()).mean()
        finally:
            handle.remove()
    return table


def nnsight_loop(lm: LoadedModel, mode: str, eps: float) -> Callable[[EncodedPrompts, list[Head]], Tensor]:
    """The same loop with nnsight (on its own copy of the model): one traced forward per head."""
    from nnsight import LanguageModel

    nn_model = LanguageModel(copy.deepcopy(lm.model), tokenizer=lm.tokenizer)
    info = lm.info

    def run(encoded: EncodedPrompts, heads: list[Head]) -> Tensor:
        input_ids, mask, last = _right_padded(lm, encoded)
        rows = torch.arange(len(last))
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        with torch.no_grad(), nn_model.trace(inputs):
            base_logits = nn_model.output.logits.save()
        base = base_logits[rows, last]
        table = _table(info)
        for layer, head in heads:
            lo, hi = head * info.head_dim, (head + 1) * info.head_dim
            with torch.no_grad(), nn_model.trace(inputs):
                attn = nn_model.model.layers[layer].self_attn
                if mode == "ua":
                    attn.q_proj.output[..., lo:hi] *= eps
                else:
                    attn.o_proj.input[..., lo:hi] *= eps
                logits = nn_model.output.logits.save()
            table[layer, head] = _kl(base, logits[rows, last]).mean()
        return table

    return run


def transformer_lens_loop(
    lm: LoadedModel, mode: str, eps: float
) -> Callable[[EncodedPrompts, list[Head]], Tensor]:
    """The same loop with TransformerLens 4 (a TransformerBridge around its own copy of the model)."""
    from transformer_lens import TransformerBridge

    from finesteer.models.offline import resolve_registry_model

    bridge = TransformerBridge.boot_transformers(
        str(resolve_registry_model(lm.name)),
        hf_model=copy.deepcopy(lm.model),
        tokenizer=lm.tokenizer,
        dtype=torch.float32,
    )
    info = lm.info
    hook_name = "hook_q" if mode == "ua" else "hook_z"

    def run(encoded: EncodedPrompts, heads: list[Head]) -> Tensor:
        input_ids, mask, last = _right_padded(lm, encoded)
        rows = torch.arange(len(last))

        def forward(hooks: list[tuple[str, Callable[..., Tensor]]]) -> Tensor:
            with torch.no_grad():
                logits = bridge.run_with_hooks(input_ids, attention_mask=mask, fwd_hooks=hooks)
            return logits[rows, last]

        base = forward([])
        table = _table(info)
        for layer, head in heads:

            def scale(act: Tensor, hook: Any, head: int = head) -> Tensor:
                act = act.clone()
                act[:, :, head] *= eps  # [batch, seq, heads, head_dim]
                return act

            table[layer, head] = _kl(base, forward([(f"blocks.{layer}.attn.{hook_name}", scale)])).mean()
        return table

    return run


def finesteer_engine(
    engine: str,
    lm: LoadedModel,
    encoded: EncodedPrompts,
    mode: str,
    eps: float,
    batch: int,
    heads: list[Head],
) -> Tensor:
    """finesteer's `scan` (simple) or `fast_scan` (fast) of single-head ablations, KL from its own base."""
    scanner = scan if engine == "simple" else fast_scan
    base = scanner(lm, encoded, [ablation([], mode, eps)], LastLogits(), batch_size=batch, progress=False)[0]
    candidates = [ablation([h], mode, eps) for h in heads]
    kl = scanner(lm, encoded, candidates, KLFromBase(base), batch_size=batch, progress=False).mean(1)
    table = _table(lm.info)
    for (layer, head), value in zip(heads, kl.tolist(), strict=True):
        table[layer, head] = value
    return table


def _top_heads(table: Tensor, k: int) -> set[tuple[int, int]]:
    flat = table.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    return {(i // table.shape[1], i % table.shape[1]) for i in order}


def _subset(heads: list[Head], count: int | None) -> list[Head]:
    """`count` heads spread evenly over the model (every head when count is None or too large)."""
    if count is None or count >= len(heads):
        return heads
    step = len(heads) / count
    return [heads[int(i * step)] for i in range(count)]


def bench_model(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    lm = load_model(name)
    queries = [item.prompt for item in load_dataset(args.data, limit=args.prompts)]
    encoded = encode_prompts(lm, format_queries(lm, queries))
    lengths = [len(ids) for ids in encoded.ids]
    log(f"{name}: {len(encoded)} prompts of {min(lengths)}–{max(lengths)} tokens, {load_note()}")
    heads = all_heads(lm.info)
    methods, notes = _methods(args, lm, encoded, heads)
    results, times, cpu = _run_interleaved(methods, notes, args.repeats)
    return _rows(args, name, heads, methods, notes, results, times, cpu)


Methods = dict[str, tuple[Callable[[], Any], list[Head]]]


def _methods(
    args: argparse.Namespace, lm: LoadedModel, encoded: EncodedPrompts, heads: list[Head]
) -> tuple[Methods, dict[str, str]]:
    """Every method to time (a callable and the heads it scans), and notes on those that cannot run."""
    mode, eps, batch = args.mode, args.eps, args.batch_size
    some = _subset(heads, args.peer_heads)
    methods: Methods = {"raw hooks loop (a)": (lambda: raw_hooks_loop(lm, encoded, mode, eps, heads), heads)}
    notes: dict[str, str] = {}
    for label, build in (
        ("nnsight loop (b)", nnsight_loop),
        ("TransformerLens loop (b)", transformer_lens_loop),
    ):
        if label in args.skip:
            notes[label] = "skipped (--skip)"
            continue
        try:  # built once, outside the timing, as a user would
            with contextlib.redirect_stdout(io.StringIO()):
                runner = build(lm, mode, eps)
        except Exception as exc:  # a peer that cannot load this model: say why, go on
            notes[label] = (
                f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
            log(f"  {label}: {notes[label]}")
            continue
        methods[label] = (lambda runner=runner: runner(encoded, some), some)
    methods["finesteer simple scan (c)"] = (
        lambda: finesteer_engine("simple", lm, encoded, mode, eps, batch, some),
        some,
    )
    methods["finesteer fast scan (d)"] = (
        lambda: finesteer_engine("fast", lm, encoded, mode, eps, batch, heads),
        heads,
    )
    methods["finesteer pre-ranked (e)"] = (
        lambda: pre_ranked_scan(
            lm,
            encoded,
            KLDivergence(args.outcomes),
            mode=mode,
            eps=eps,
            top_n=args.top_n,
            batch_size=batch,
            progress=False,
        ),
        heads,
    )
    for label in args.skip:
        if label in methods and label != "raw hooks loop (a)":
            del methods[label]
            notes[label] = "skipped (--skip)"
    return methods, notes


def _run_interleaved(
    methods: Methods, notes: dict[str, str], repeats: int
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, list[float]]]:
    """Each method's result, wall and CPU seconds per run; a method that fails gets a note instead."""
    results: dict[str, Any] = {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(repeats):  # interleaved, so load drift hits every method alike
        for method, (fn, _) in methods.items():
            if method in notes:
                continue
            started, started_cpu = time.perf_counter(), time.process_time()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    results[method] = fn()
            except Exception as exc:  # a peer that cannot run this model: say why, go on
                notes[method] = (
                    f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                )
                log(f"  {method}: {notes[method]}")
                continue
            times[method].append(time.perf_counter() - started)
            cpu[method].append(time.process_time() - started_cpu)
            log(
                f"  run {repeat + 1}/{repeats} {method}: {times[method][-1]:.1f} s, "
                f"cpu {cpu[method][-1]:.1f} s ({load_note()})"
            )
    return results, times, cpu


def _rows(
    args: argparse.Namespace,
    name: str,
    heads: list[Head],
    methods: Methods,
    notes: dict[str, str],
    results: dict[str, Any],
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
) -> list[dict[str, Any]]:
    """One table row per method: time and speed-up over the raw hooks loop, agreement with it."""
    reference = results["raw hooks loop (a)"]
    reference_seconds = statistics.median(times["raw hooks loop (a)"])
    reference_cpu = statistics.median(cpu["raw hooks loop (a)"])
    reference_top = _top_heads(reference, 10)
    rows = []
    for method in [*methods, *(m for m in notes if m not in methods)]:
        row: dict[str, Any] = {
            "model": name,
            "method": method,
            "seconds": None,
            "speedup": None,
            "cpu_seconds": None,
            "cpu_speedup": None,
            "max_abs_diff": None,
            "top10_overlap": None,
            "note": notes.get(method, ""),
        }
        if method in results:
            scanned = methods[method][1]
            seconds = statistics.median(times[method]) * len(heads) / len(scanned)
            cpu_seconds = statistics.median(cpu[method]) * len(heads) / len(scanned)
            value = results[method]
            runs = ", ".join(f"{t:.1f}" for t in times[method])
            if isinstance(value, PreRankedScan):
                verified = torch.zeros_like(reference, dtype=torch.bool)
                for layer, head in value.verified:
                    verified[layer, head] = True
                diff = float((value.scores.scores - reference).abs()[verified].max())
                overlap = len(reference_top & set(value.top_heads(10)))
                note = (
                    f"top {args.top_n} of {len(heads)} heads verified exactly (KL estimate over the "
                    f"{args.outcomes} likeliest tokens + rest); estimate {value.seconds['estimate']:.1f} s + "
                    f"verify {value.seconds['verify']:.1f} s; Spearman(estimate, exact) over all heads "
                    f"{spearman(value.estimate.scores, reference):.2f}; runs {runs} s"
                )
            elif len(scanned) < len(heads):
                finite = torch.isfinite(value)
                diff = float((value - reference).abs()[finite].max())
                overlap = None
                note = (
                    f"{len(scanned)} of {len(heads)} heads timed, seconds scaled to all heads; runs {runs} s"
                )
            else:
                diff = float((value - reference).abs().max())
                overlap = len(reference_top & _top_heads(value, 10))
                note = f"runs {runs} s"
            row.update(
                seconds=round(seconds, 2),
                speedup=round(reference_seconds / seconds, 2),
                cpu_seconds=round(cpu_seconds, 2),
                cpu_speedup=round(reference_cpu / cpu_seconds, 2),
                max_abs_diff=diff,
                top10_overlap=overlap,
                note=note,
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="Registry model (repeatable); default: both.")
    parser.add_argument("--data", default="advbench")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--mode", choices=("ua", "sc"), default="ua")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-n", type=int, default=16)
    parser.add_argument("--outcomes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peer-heads",
        type=int,
        default=None,
        help="Time nnsight, TransformerLens and the simple scan on this many evenly spread heads and scale "
        "their seconds to all heads (default: every head). The raw loop and fast paths always scan all.",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="Method name to leave out (repeatable), e.g. 'nnsight loop (b)'.",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a busy shared CPU."
    )
    parser.add_argument("--json", action="store_true", help="Print the table as JSON records.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    models = args.model or ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    rows = [row for name in models for row in bench_model(args, name)]
    title = (
        f"Query-level Ships ({args.mode}, ε={args.eps:g}) over all heads, {args.prompts} {args.data} "
        f"prompts; median of {args.repeats} runs, torch threads {torch.get_num_threads()}, {load_note()}"
    )
    print_table(title, rows, COLUMNS, args.json)
    if not args.json:
        print(f"\n{load_note()} at the end", flush=True)


if __name__ == "__main__":
    main()
