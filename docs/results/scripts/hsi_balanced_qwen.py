"""HSI with answer-format-balanced directions on Qwen2.5-Coder-0.5B, coordinate-other-ais (issue 14, item 8).

Same data as the demo recipe run in docs/results/hsi_qwen0.5b.md (120 train items, 24 validation,
50 test, seed 0), both option orders everywhere; directions with the answer-letter and Yes/No axes
projected out; heads ranked and candidates chosen on the worst letter × polarity group; the choice
tested against random-head controls on validation; the test split scored once, both orders, split by
matching polarity, beside the random-head controls of the chosen setting.

    flock /tmp/finesteer-real.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src \
        python docs/results/scripts/hsi_balanced_qwen.py --out docs/results/hsi_qwen0.5b_balanced.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from finesteer.activations.directions import HeadDirections
from finesteer.data.balance import letter_balanced
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.evaluate.ab_paired import ab_effect_vs, ab_effect_vs_controls
from finesteer.fit.controls import CONTROL_SEEDS, random_head_control
from finesteer.fit.hsi import HSIConfig, fit_hsi_selection
from finesteer.fit.hsi_directions import DIRECTIONS_FILE
from finesteer.methods import load_behaviour_data
from finesteer.methods.verdict import attach_verdict
from finesteer.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--alphas", default="16,32")
    parser.add_argument("--n-sweep", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--run-dir", default="runs/hsi-qwen-balanced")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()
    data = load_behaviour_data(
        "coordinate-other-ais", train_limit=120, val_limit=24, test_limit=50, open_ended_limit=1, seed=0
    )
    lm = load_model(args.model)
    config = HSIConfig(
        k=args.k,
        alphas=tuple(float(a) for a in args.alphas.split(",")),
        n_sweep=args.n_sweep,
        rank_by="polarity",
        balance_format=True,
    )
    run_dir = Path(args.run_dir)
    fitted, selection = fit_hsi_selection(lm, data.train, data.val, config, run_dir=run_dir)
    attach_verdict(fitted.metadata, selection.evidence, "HSI selection")
    fit_seconds = time.perf_counter() - started
    test = letter_balanced(data.test_ab, strict=False)
    base = ab_matching_rate_prob(lm, test)
    steered = ab_matching_rate_prob(lm, test, intervention=fitted.intervention)
    directions = HeadDirections.load(run_dir / DIRECTIONS_FILE)  # saved by the fit
    controls = []
    for seed in CONTROL_SEEDS:
        control = random_head_control(directions, selection.heads, selection.alpha, seed)
        controls.append(ab_matching_rate_prob(lm, test, intervention=control.intervention))
    result = {
        "command": "python docs/results/scripts/hsi_balanced_qwen.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": args.model,
        "config": {
            "k": config.k,
            "alphas": list(config.alphas),
            "n_sweep": config.n_sweep,
            "rank_by": config.rank_by,
            "balance_format": True,
            "balance_letters": True,
        },
        "verdict": fitted.metadata.get("verdict"),
        "heads": fitted.metadata["heads"],
        "alpha": fitted.metadata["alpha"],
        "selection_verdict": fitted.metadata.get("selection_verdict"),
        "direction_diagnostics": fitted.metadata.get("direction_diagnostics"),
        "sweep_top": fitted.metadata["sweep"]["top"],
        "selection": fitted.metadata["selection"],
        "test": {
            "n_rows": len(test),
            "baseline": base.to_dict(per_item=False),
            "steered": steered.to_dict(per_item=False),
            "effect_vs_unmodified": ab_effect_vs(base, steered).to_dict(),
            "controls": [c.to_dict(per_item=False) for c in controls],
            "controls_vs_unmodified": [
                ab_effect_vs(base, c).to_dict()["by_matching_polarity"] for c in controls
            ],
            "effect_vs_controls": ab_effect_vs_controls(controls, steered).to_dict(),
        },
        "seconds": {"fit": round(fit_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("verdict", "heads", "alpha", "seconds")}))


if __name__ == "__main__":
    main()
