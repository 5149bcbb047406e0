"""Print a frontier run's tables as Markdown (the report's point table, then equal-cost comparisons).

    python docs/results/scripts/frontier_tables.py runs/frontier-qwen0.5b/frontier/frontier.json
"""

from __future__ import annotations

import json
import sys

from finesteer.report.frontier import equal_cost_table, frontier_table, markdown


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        table = json.load(f)
    print(markdown(frontier_table(table)))
    for key in ("equal_over_refusal", "equal_kl"):
        if key in table:
            print(f"\n{equal_cost_table(table[key]).title}\n")
            print(markdown(equal_cost_table(table[key])))
    print("\ncontrols (mean ± sd over seeds):")
    for c in table["controls"]:
        print(f"  {c['series']} k={c['strength']:g}: y {c['y']}, kl {c['kl']}")


if __name__ == "__main__":
    main()
