"""CAA layer × multiplier sweep: prefix-cached tail re-runs vs one full forward per configuration.

Prints wall times, their ratio, and the largest difference in p(matching) between the two paths
(they must agree: the fast path only skips recomputing positions the edit cannot change).

    python benchmarks/caa_sweep.py --model smollm2-135m-instruct --items 16 --layers 6 --multipliers 1,2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="coordinate-other-ais")
    parser.add_argument("--items", type=int, default=16, help="validation items scored per configuration")
    parser.add_argument("--layers", type=int, default=6, help="number of layers swept (evenly spaced)")
    parser.add_argument("--multipliers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from finesteer import load_model
    from finesteer.data import load_dataset
    from finesteer.fit.caa import caa_intervention
    from finesteer.fit.caa_tail import instruction_tail_tokens
    from finesteer.fit.caa_vectors import caa_vectors
    from finesteer.scoring.ab import ABScorer

    lm = load_model(args.model)
    items = list(load_dataset(args.data, split="generate"))
    train, val = items[: args.items], items[-args.items :]
    n_layers = lm.info.n_layers
    layers = sorted({round(i * (n_layers - 1) / max(1, args.layers - 1)) for i in range(args.layers)})
    mults = [float(m) for m in args.multipliers.split(",")]
    vectors = caa_vectors(lm, train, layers=layers, batch_size=args.batch_size)
    k = instruction_tail_tokens(lm.tokenizer)
    grid = [(layer, m) for layer in layers for m in mults]
    print(
        f"{args.model}: {len(grid)} configurations × {len(val)} items, K = {k}, "
        f"threads {torch.get_num_threads()}"
    )

    edits = [caa_intervention(vectors.vector(layer), layer, m, k) for layer, m in grid]
    scorer = ABScorer(lm, val, batch_size=args.batch_size)
    started = time.perf_counter()
    fast = scorer.score(edits, reuse_prefix=k)
    t_fast = time.perf_counter() - started

    started = time.perf_counter()
    plain = scorer.score(edits)  # full forward per configuration
    t_plain = time.perf_counter() - started

    diff = float((fast.p_matching - plain.p_matching).abs().max())
    print(f"plain (full forward per configuration): {t_plain:.1f}s")
    print(f"prefix-cached (tail re-run):            {t_fast:.1f}s")
    print(f"speed-up: {t_plain / t_fast:.1f}x   max |Δ p(matching)|: {diff:.2e}")


if __name__ == "__main__":
    main()
