"""Batched vs one-at-a-time A/B letter probabilities: speed ratio and the largest difference in p(matching).

    python benchmarks/bench_ab_batching.py smollm2-135m-instruct --items 24 --batch-size 8

Prints wall seconds for batch size 1 and the given batch size, the speed-up ratio, and
max |Δ p(matching)| between the two (should be float noise, ≲ 1e-5).
"""

from __future__ import annotations

import argparse
import time

from finesteer.data import load_dataset
from finesteer.models import load_model
from finesteer.scoring.ab import ABScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="coordinate-other-ais")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    lm = load_model(args.model)
    items = load_dataset(args.data, limit=args.items)
    ABScorer(lm, items[:2]).score([None])  # warm-up
    timings = {}
    results = {}
    for batch_size in (1, args.batch_size):
        start = time.perf_counter()
        results[batch_size] = ABScorer(lm, items, batch_size=batch_size).score([None])
        timings[batch_size] = time.perf_counter() - start
    diff = float((results[1].p_matching - results[args.batch_size].p_matching).abs().max())
    print(f"model {args.model}, {len(items)} items of {args.data}")
    print(f"batch size 1: {timings[1]:.2f} s; batch size {args.batch_size}: {timings[args.batch_size]:.2f} s")
    print(f"speed-up ratio: {timings[1] / timings[args.batch_size]:.2f}x; max |Δ p(matching)| = {diff:.2e}")


if __name__ == "__main__":
    main()
