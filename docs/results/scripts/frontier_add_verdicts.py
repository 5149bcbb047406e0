"""Give a frontier table measured before points had verdicts the verdicts `finesteer frontier` now adds
(`finesteer.evaluate.frontier_verdicts`), from the per-prompt outcomes stored in its run folder.

    python docs/results/scripts/frontier_add_verdicts.py FRONTIER_JSON RUN_FOLDER/points

Rewrites FRONTIER_JSON in place (the same computation a rerun of the frontier command does when it
resumes every point).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finesteer.evaluate.frontier_verdicts import add_point_verdicts


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: frontier_add_verdicts.py FRONTIER_JSON RUN_FOLDER/points")
    path, points = Path(sys.argv[1]), Path(sys.argv[2])
    if not path.is_file() or not points.is_dir():
        sys.exit(f"error: need a frontier.json ({path}) and its run's points folder ({points})")
    table = json.loads(path.read_text(encoding="utf-8"))
    missing = [row["id"] for row in table.get("points", []) if not (points / f"{row['id']}.json").is_file()]
    if missing or "points" not in table:
        sys.exit(f"error: {points} lacks the stored outcomes of {', '.join(missing) or 'every point'}; "
                 f"{path} is left unchanged")
    y = {}
    for row in table["points"]:
        refused = json.loads((points / f"{row['id']}.json").read_text(encoding="utf-8"))["outcomes"][
            "refused_harmful"
        ]
        y[row["id"]] = list(refused) if table["goal"] == "induce" else [1.0 - r for r in refused]
    base = next((r["id"] for r in table["points"] if r["kind"] == "baseline"), None)
    settings = table.get("settings", {})
    add_point_verdicts(table["points"], y, base, confidence=settings.get("confidence", 0.95))
    path.write_text(json.dumps(table, indent=1), encoding="utf-8")
    for row in table["points"]:
        if "verdict" in row:
            v = row["verdict"]
            delta, p = v["difference"], v["p_value"]
            print(f"{row['id']}: {v['verdict']} vs {v['against']} (Δ {delta:+.3f}, p {p:.3g})")


if __name__ == "__main__":
    main()
