"""Print a `finesteer compare` A/B result as the Markdown table the docs use: every method with its
interval (both option orders), the change against the unmodified model, its matched control, method −
control, the Holm-adjusted p-value and verdict, the anti-steerable fraction, the matching rate split
by the matching answer's polarity, the generated A/B rate, fluency and harmless KL.

    python docs/results/scripts/compare_table.py RUN_FOLDER/results.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _ci(e: dict[str, Any] | None, key: str = "value", digits: int = 2) -> str:
    if not e or e.get(key) is None:
        return "–"
    value = e[key]
    text = f"{value:+.{digits}f}" if key == "difference" else f"{value:.{digits}f}"
    if e.get("low") is None or e.get("high") is None:
        return text
    sign = "+" if key == "difference" else ""
    return f"{text} [{e['low']:{sign}.{digits}f}, {e['high']:{sign}.{digits}f}]"


def _polarity(row: dict[str, Any]) -> str:
    groups = row.get("ab_by_matching_polarity") or {}
    return " / ".join(f"{g['matching_rate']:.2f} ({name}, n={g['n']})" for name, g in groups.items()) or "–"


def _row(name: str, row: dict[str, Any]) -> str:
    interval = (row.get("ab_interval") or {}).get("matching_rate") or {"value": row.get("ab_matching_rate")}
    vs_base = row.get("vs_baseline") or {}
    vs_control = row.get("vs_control") or {}
    spread = row.get("control_matching_rate") or {}
    if spread.get("mean") is not None:
        control = f"{spread['mean']:.2f} ± {spread['std']:.2f}" if spread.get("std") is not None else "–"
    else:
        control = "none" if name != "baseline" else "–"
    verdict = row.get("verdict") or {}
    p = verdict.get("p_value")
    anti = vs_base.get("anti_steerable_fraction")
    generated = row.get("ab_matching_rate_generated")
    generated_cell = "–" if generated is None else f"{generated:.2f} [{row.get('ab_n_undefined', 0)}]"
    fluency = row.get("fluency_interval") or {"value": row.get("fluency")}
    kl = row.get("kl_interval") or {"value": row.get("kl_harmless")}
    cells = [
        name,
        _ci(interval),
        _ci(vs_base.get("matching"), "difference"),
        control,
        _ci(vs_control.get("matching"), "difference"),
        "–" if p is None else f"{p:.3f}",
        str(verdict.get("verdict", "–")) + (" ⚠ answer bias" if verdict.get("caveats") else ""),
        _ci(anti),
        _polarity(row),
        generated_cell,
        _ci(fluency),
        _ci(kl, digits=3),
    ]
    return "| " + " | ".join(cells) + " |"


def _load(path: str) -> dict[str, Any]:
    """The comparison's methods, or exit naming the problem (a missing file, or a refusal-task result,
    whose rows have no A/B scores and would print as an empty A/B table)."""
    try:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError) as err:
        sys.exit(f"error: cannot read {path}: {err}")
    methods = result.get("methods") if isinstance(result, dict) else None
    if not isinstance(methods, dict) or not methods:
        sys.exit(f"error: {path} has no 'methods'; pass a `finesteer compare` results.json")
    no_ab = [name for name, row in methods.items() if "ab_matching_rate" not in row]
    if no_ab:
        sys.exit(f"error: {path}: methods without A/B scores ({', '.join(no_ab)}); this table is for the "
                 "A/B task (a refusal comparison prints its own table.md)")
    return methods


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/results/scripts/compare_table.py RUN_FOLDER/results.json")
    methods = _load(sys.argv[1])
    print("| method | A/B match, both orders [95% CI] | Δ vs unmodified [CI] | control ± sd (3 seeds) | "
          "method − control [CI] | p (Holm) | verdict | anti-steerable [CI] | match by polarity | "
          "generated [undefined] | fluency | KL harmless |")
    print("|" + "---|" * 12)
    for name, row in methods.items():
        print(_row(name, row))
    caveats = [(n, c) for n, row in methods.items() for c in (row.get("verdict") or {}).get("caveats") or []]
    if caveats:
        print()
    for name, caveat in caveats:
        print(f"- ⚠ {name}: {caveat}")


if __name__ == "__main__":
    main()
