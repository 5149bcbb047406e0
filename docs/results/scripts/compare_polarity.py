"""A comparison run's steering methods, scored on the test split by the matching answer's polarity.

For every method of a `finesteer compare` run folder that is an intervention artifact
(`fits/<name>/artifact`: HSI, ITI, CAA) or a system prompt (`prompt`), plus the unmodified model,
this prints the letter-probability matching rate on the test split in the given option order and
swapped, overall and split by whether the matching option starts with "Yes", "No" or other
(`ABResult.by_matching_polarity`). A method that only adds a "Yes" bias gains on the first group
and loses on the second.

    python docs/results/scripts/compare_polarity.py MODEL RUN_DIR [BEHAVIOUR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from finesteer.artifacts import load_intervention
from finesteer.data.balance import swap_options
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.methods import load_behaviour_data
from finesteer.models import load_model
from finesteer.scoring.ab import ABPrompt


def main() -> None:
    torch.set_num_threads(1)
    model, run_dir = sys.argv[1], Path(sys.argv[2])
    behaviour = sys.argv[3] if len(sys.argv) > 3 else "coordinate-other-ais"
    lm = load_model(model)
    test = list(load_behaviour_data(behaviour).test_ab)
    orders = {"as given": test, "options swapped": [swap_options(item) for item in test]}
    setups: dict[str, dict] = {"baseline": {}}
    prompt_file = run_dir / "methods" / "prompt.json"
    if prompt_file.is_file():
        system = json.loads(prompt_file.read_text())["result"]["system_prompt"]
        setups["prompt"] = {"prompt": ABPrompt(system)}
    for artifact in sorted(run_dir.glob("fits/*/artifact")):
        setups[artifact.parent.name] = {"intervention": load_intervention(artifact).intervention}
    report: dict = {"model": model, "run_dir": str(run_dir), "n": len(test), "methods": {}}
    for name, setup in setups.items():
        rows = {}
        for order, items in orders.items():
            result = ab_matching_rate_prob(lm, items, batch_size=8, **setup)
            rows[order] = {"matching_rate": result.matching_rate, **result.by_matching_polarity()}
        report["methods"][name] = rows
        print(name, json.dumps(rows), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
