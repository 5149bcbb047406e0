"""Certified head ranking vs a plain hooked loop: query-level Ships (KL) over every head, one run.

    python benchmarks/bench_certify.py --model smollm2-135m-instruct --mode ua --raw-heads 54 \
        --threads 1 --json

Rows, each timed once in this process (wall and process CPU seconds; with `--threads 1` CPU time is
the compute itself, the steadier number on a shared machine):

- (a) raw hooks loop: `bench_fast_scan.raw_hooks_loop` (one hand-hooked forward of all prompts per head,
  full logits), timed on `--raw-heads` evenly spread heads and scaled to all heads;
- (d) finesteer fast exact scan of every head: the reference ranking (equal to (a) where both ran;
  the max difference is reported);
- (e) pre-ranked: attribution estimate, then the `--top-n` best verified exactly (`pre_ranked_scan`);
- (f) certified: the estimate, then adaptive verification with the calibrated stop rule and random
  sample (`certified_scan`), which prints the bound on what it did not verify.

Columns: seconds and speed-ups over (a); top-10 overlap with (d)'s exact top 10; heads verified; the
bound p and how many randomly sampled heads beat the k-th best. `--save` writes the exact table and
the estimate (for diagnostics).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from _bench import load_note, log, print_table
from bench_fast_scan import finesteer_engine, raw_hooks_loop

from finesteer.data import load_dataset
from finesteer.locate.attribution.metrics import KLDivergence
from finesteer.locate.attribution.prerank import PreRankedScan, certified_scan, pre_ranked_scan
from finesteer.locate.engine import encode_prompts
from finesteer.locate.rank_stats import spearman
from finesteer.locate.ships import all_heads, format_queries
from finesteer.models import load_model
from finesteer.sites import Head

COLUMNS = (
    "model", "mode", "method", "seconds", "speedup", "cpu_seconds", "cpu_speedup", "top10_overlap",
    "verified", "p_miss", "note",
)  # fmt: skip


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    started, started_cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - started, time.process_time() - started_cpu


def _spread(heads: list[Head], count: int) -> list[Head]:
    if count >= len(heads):
        return heads
    step = len(heads) / count
    return [heads[int(i * step)] for i in range(count)]


def _top(table: torch.Tensor, k: int = 10) -> set[Head]:
    flat = table.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    return {(i // table.shape[1], i % table.shape[1]) for i in order}


def bench(args: argparse.Namespace, name: str, mode: str) -> list[dict[str, Any]]:
    lm = load_model(name)
    queries = [item.prompt for item in load_dataset(args.data, limit=args.prompts)]
    encoded = encode_prompts(lm, format_queries(lm, queries))
    heads = all_heads(lm.info)
    some = _spread(heads, args.raw_heads or len(heads))
    log(f"{name} {mode}: {len(encoded)} prompts, {len(heads)} heads, {load_note()}")
    eps, batch = args.eps, args.batch_size
    raw, raw_s, raw_c = _timed(lambda: raw_hooks_loop(lm, encoded, mode, eps, some))
    scale = len(heads) / len(some)
    raw_s, raw_c = raw_s * scale, raw_c * scale
    log(f"  (a) {raw_s:.1f} s, cpu {raw_c:.1f} s (scaled from {len(some)} heads; {load_note()})")
    if args.skip_exact:  # the reference is then the raw loop's heads only (no top-10 check)
        exact, fast_s, fast_c = raw, math.nan, math.nan
    else:
        exact, fast_s, fast_c = _timed(lambda: finesteer_engine("fast", lm, encoded, mode, eps, batch, heads))
    log(f"  (d) {fast_s:.1f} s, cpu {fast_c:.1f} s ({load_note()})")
    finite = torch.isfinite(raw)
    diff = float((raw - exact).abs()[finite].max())
    reference = set() if args.skip_exact else _top(exact)
    common = {"mode": mode, "eps": eps, "batch_size": batch, "progress": False}
    metric = KLDivergence(args.outcomes)
    fixed, fixed_s, fixed_c = _timed(lambda: pre_ranked_scan(lm, encoded, metric, top_n=args.top_n, **common))
    log(f"  (e) {fixed_s:.1f} s, cpu {fixed_c:.1f} s ({load_note()})")
    cert, cert_s, cert_c = _timed(
        lambda: certified_scan(
            lm, encoded, metric, k=10, confidence=args.confidence, sample=args.sample, step=args.step,
            max_verify=args.max_verify, **common,
        )
    )  # fmt: skip
    log(
        f"  (f) {cert_s:.1f} s, cpu {cert_c:.1f} s ({load_note()}); {cert.bound.line() if cert.bound else ''}"
    )
    if args.save:
        torch.save(
            {"exact": exact, "estimate": cert.estimate.scores, "raw": raw}, args.save + f".{name}.{mode}.pt"
        )
    known = torch.isfinite(exact.flatten())
    rho = spearman(cert.estimate.scores.flatten()[known], exact.flatten()[known])
    base = {"model": name, "mode": mode}

    def row(method: str, s: float, c: float, result: PreRankedScan | None, note: str) -> dict[str, Any]:
        out = {**base, "method": method, "seconds": round(s, 2), "speedup": round(raw_s / s, 2),
               "cpu_seconds": round(c, 2), "cpu_speedup": round(raw_c / c, 2), "note": note}  # fmt: skip
        if result is not None:
            assert result.bound is not None
            out.update(
                top10_overlap=len(reference & set(result.top_heads(10))) if reference else None,
                verified=len(result.verified),
                p_miss=round(result.bound.p, 4),
            )
            took = result.seconds
            out["note"] = (
                f"{note}estimate {took['estimate']:.1f} s + verify {took['verify']:.1f} s; "
                f"random sample {result.bound.sample_size}, in the top 10: {result.bound.sample_hits}; "
                f"stopped: {result.bound.stopped}"
            )
        return out

    rows = [row("raw hooks loop (a)", raw_s, raw_c, None, f"{len(some)} of {len(heads)} heads timed, scaled")]
    if not args.skip_exact:
        fast = row("finesteer fast exact (d)", fast_s, fast_c, None, f"max |Δ| vs (a) {diff:.2g}")
        rows.append({**fast, "top10_overlap": 10})
    return [
        *rows,
        row("finesteer pre-ranked (e)", fixed_s, fixed_c, fixed, f"top {args.top_n} verified; "),
        row("finesteer certified (f)", cert_s, cert_c, cert, f"Spearman(estimate, exact) {rho:.2f}; "),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="Registry model (repeatable); default: both.")
    parser.add_argument("--mode", action="append", choices=("ua", "sc"), help="Repeatable; default: both.")
    parser.add_argument("--data", default="advbench")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-n", type=int, default=16)
    parser.add_argument("--outcomes", type=int, default=2)
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--sample", type=int, default=4)
    parser.add_argument("--step", type=int, default=4)
    parser.add_argument("--max-verify", type=int, default=None)
    parser.add_argument("--raw-heads", type=int, default=None, help="Time (a) on this many heads, scaled.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-exact", action="store_true", help="No (d): too slow for the machine's time.")
    parser.add_argument("--save", default=None, help="Path prefix for the exact and estimated tables (.pt).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = args.model or ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    rows = [r for name in models for mode in (args.mode or ["ua", "sc"]) for r in bench(args, name, mode)]
    threads = torch.get_num_threads()
    title = f"Certified ranking, {args.prompts} {args.data} prompts, threads {threads}, {load_note()}"
    print_table(title, rows, COLUMNS, args.json)


if __name__ == "__main__":
    main()
