"""One compact Markdown row per frontier point: y with its interval, the change against the unmodified
model, the share of the reference's change (directional ablation), first-token p(refusal), KL and
over-refusal, y − control and the verdict (Holm over the points; `finesteer.evaluate.frontier_verdicts`);
random controls as mean ± sd over seeds.

    python docs/results/scripts/frontier_compact.py runs/frontier-qwen0.5b/frontier/frontier.json
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _ci(e: dict[str, Any] | None, digits: int = 2, signed: bool = False) -> str:
    if not e or e.get("value", e.get("difference")) is None:
        return "–"
    value = e.get("value", e.get("difference"))
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if e.get("low") is None or e.get("high") is None:
        return f.format(value)
    return f"{f.format(value)} [{f.format(e['low'])}, {f.format(e['high'])}]"


def _verdict(v: dict[str, Any] | None) -> str:
    if not v:
        return "–"
    against = "control" if str(v.get("against", "")).startswith("control") else "unmodified"
    p = v.get("p_value")
    return f"{v['verdict']} ({against}{'' if p is None else f', p = {p:.2g}'})"


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        table = json.load(handle)
    print("| condition | heads | y [95% CI] | Δy vs unmodified | share of the direction's Δy | "
          "p(refusal), first token | KL harmless | over-refusal | y − control [CI] | verdict (against) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    controls: dict[str, list[dict[str, Any]]] = {}
    for row in table["points"]:
        if row["kind"] == "control":
            controls.setdefault(f"{row['series']}@{row['strength']:g}", []).append(row)
            continue
        heads = ", ".join(f"{a}.{b}" for a, b in row["metadata"].get("heads", [])) or "–"
        print(f"| {row['id']} | {heads} | {_ci(row['y'])} | {_ci(row.get('y_effect'), signed=True)} | "
              f"{_ci(row.get('share_of_reference'))} | {_ci(row.get('p_refusal_first_token'))} | "
              f"{_ci(row['kl'], 3)} | {_ci(row['over_refusal'])} | "
              f"{_ci(row.get('vs_control'), signed=True)} | {_verdict(row.get('verdict'))} |")
    for name, rows in controls.items():
        ys = [r["y"]["value"] for r in rows]
        shares = [r["share_of_reference"]["value"] for r in rows if r.get("share_of_reference")]
        share = f"{statistics.mean(shares):+.2f} ± {statistics.pstdev(shares):.2f}" if shares else "–"
        kl = statistics.mean(r["kl"]["value"] for r in rows)
        over = statistics.mean(r["over_refusal"]["value"] for r in rows)
        first = statistics.mean(r["p_refusal_first_token"]["value"] for r in rows)
        y = f"{statistics.mean(ys):.2f} ± {statistics.pstdev(ys):.2f}"
        cells = [f"{name} ({len(rows)} seeds)", "random", y, "–", share]
        cells += [f"{first:.2f}", f"{kl:.3f}", f"{over:.2f}", "–", "(control)"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
