"""HSI sweep: cached-prefix last-token scoring vs one full evaluation per (head, α).

    python benchmarks/bench_hsi_sweep.py smollm2-135m-instruct --items 16 --layer 12 --alphas 4,16

Scores every head of one layer at each α both ways on the same items and prints wall seconds, the
speed-up ratio, and max |Δ p(matching)| (float noise, ≲ 1e-5). The slow path is
`ABScorer.score(..., reuse_prefix=None)` (batched, right-padded full forwards); the fast path is
`reuse_prefix=1` (cached prefix + last token), including the one-off prefix pass.
"""

from __future__ import annotations

import argparse
import time

from finesteer.activations.directions import fit_head_directions
from finesteer.data import load_dataset
from finesteer.models import load_model
from finesteer.scoring.ab import ABScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="coordinate-other-ais")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--direction-items", type=int, default=16)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--alphas", default="4,16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-rows", type=int, default=128)
    args = parser.parse_args()

    lm = load_model(args.model)
    items = load_dataset(args.data, split="generate")
    train, test = items[: args.direction_items], items[-args.items :]
    directions = fit_head_directions(lm, train, batch_size=args.batch_size)
    alphas = [float(a) for a in args.alphas.split(",")]
    interventions = [
        directions.intervention([(args.layer, h)], a) for h in range(lm.info.n_heads) for a in alphas
    ]

    start = time.perf_counter()
    scorer = ABScorer(lm, test, batch_size=args.batch_size, max_rows=args.max_rows)
    fast = scorer.score(interventions, reuse_prefix=1).p_matching
    t_fast = time.perf_counter() - start

    start = time.perf_counter()
    slow = ABScorer(lm, test, batch_size=args.batch_size).score(interventions).p_matching
    t_slow = time.perf_counter() - start
    diff = float((fast - slow).abs().max())
    print(f"model {args.model}: {len(interventions)} (head, α) rows × {len(test)} items, layer {args.layer}")
    print(f"full forwards: {t_slow:.1f} s; cached prefix + last token: {t_fast:.1f} s")
    print(f"speed-up ratio: {t_slow / t_fast:.2f}x; max |Δ p(matching)| = {diff:.2e}")


if __name__ == "__main__":
    main()
