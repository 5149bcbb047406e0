"""Is an HSI edit steering the behaviour or just a "Yes" / letter preference? Split the test by answer type.

In the CAA coordinate-other-ais files most behaviour-matching options start with "Yes", so an edit
that only makes the model say "Yes" would score well. This scores an HSI artifact on the test split
(letter probability) in the given order and with the options swapped, and separately on the items
whose matching option starts with "Yes" and those where it starts with "No" or something else.

    python docs/results/scripts/hsi_yes_bias_check.py MODEL ARTIFACT_DIR [BEHAVIOUR]
"""

from __future__ import annotations

import json
import sys

import torch

from finesteer.artifacts import load_intervention
from finesteer.data.balance import matching_polarity, swap_options
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.methods import load_behaviour_data
from finesteer.models import load_model


def share(result: object, index: list[int]) -> float:
    """Matching rate of `result` (an ABResult) on the items at `index`."""
    return sum(result.per_item[k]["is_matching"] for k in index) / len(index)  # type: ignore[attr-defined]


def main() -> None:
    torch.set_num_threads(1)
    model, artifact = sys.argv[1], sys.argv[2]
    behaviour = sys.argv[3] if len(sys.argv) > 3 else "coordinate-other-ais"
    lm = load_model(model)
    steer = load_intervention(artifact).intervention
    test = list(load_behaviour_data(behaviour).test_ab)
    orders = {"as given": test, "options swapped": [swap_options(item) for item in test]}
    report: dict = {"model": model, "artifact": artifact, "n": len(test)}
    for order, items in orders.items():
        kinds = [matching_polarity(i) for i in items]
        groups = {
            "all": list(range(len(items))),
            "matching starts with yes": [k for k, t in enumerate(kinds) if t == "yes"],
            "matching starts with no": [k for k, t in enumerate(kinds) if t == "no"],
            "other": [k for k, t in enumerate(kinds) if t == "other"],
        }
        base = ab_matching_rate_prob(lm, items, batch_size=8)
        steered = ab_matching_rate_prob(lm, items, intervention=steer, batch_size=8)
        rows = {}
        for name, index in groups.items():
            if not index:
                continue
            rows[name] = {"n": len(index), "unmodified": share(base, index), "hsi": share(steered, index)}
        letters = [steered.per_item[k]["choice"] for k in range(len(items))]
        rows["steered answers A / B"] = [letters.count("A"), letters.count("B")]
        report[order] = rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
