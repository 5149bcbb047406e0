"""Time the simple Ships scan (one hooked forward per head × prompt batch) and extrapolate to all heads.

    python benchmarks/ships_scan.py --model qwen2.5-coder-0.5b-instruct --heads 8 --prompts 32

Prints seconds per candidate head, forwards per second, the time a full scan of every head would take,
and the ratio to an unhooked forward pass over the same batches (the hook overhead).
"""

from __future__ import annotations

import argparse
import time

import torch

from finesteer.data import load_dataset
from finesteer.interventions import Intervention
from finesteer.locate.engine import encode_prompts
from finesteer.locate.scan import KLAndHidden, LastLogits, scan
from finesteer.locate.ships import ablation, all_heads, format_queries
from finesteer.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="refusal-direction-harmful")
    parser.add_argument("--split", default="train")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8, help="Candidate heads timed (spread over layers).")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    lm = load_model(args.model)
    queries = [item.prompt for item in load_dataset(args.data, split=args.split, limit=args.prompts)]
    encoded = encode_prompts(lm, format_queries(lm, queries))
    heads = all_heads(lm.info)
    step = max(1, len(heads) // args.heads)
    chosen = heads[::step][: args.heads]
    candidates = [ablation([h], "ua") for h in chosen]
    n_batches = -(-len(encoded) // args.batch_size)

    started = time.perf_counter()
    base = scan(lm, encoded, [Intervention()], LastLogits(), batch_size=args.batch_size, progress=False)[0]
    plain = time.perf_counter() - started
    started = time.perf_counter()
    scan(lm, encoded, candidates, KLAndHidden(base), batch_size=args.batch_size, progress=False)
    elapsed = time.perf_counter() - started

    per_candidate = elapsed / len(candidates)
    print(
        f"model {args.model}: {len(encoded)} prompts, {n_batches} batches of ≤{args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"unhooked forward pass over all batches: {plain:.2f} s")
    print(
        f"{len(candidates)} heads scanned in {elapsed:.1f} s: {per_candidate:.2f} s/head, "
        f"{len(candidates) * n_batches / elapsed:.2f} forwards/s"
    )
    print(f"hooked / unhooked time per pass: {per_candidate / plain:.2f}x")
    print(f"extrapolated full scan of {len(heads)} heads: {per_candidate * len(heads) / 60:.1f} min")


if __name__ == "__main__":
    main()
