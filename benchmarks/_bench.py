"""Shared helpers of the benchmark scripts: the load note, stderr logging, the table (markdown or JSON)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.2f}"
    return str(value)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """A markdown table on stdout, or with `as_json` the rows as a JSON list of records."""
    if as_json:
        print(json.dumps(list(rows), indent=1))
        return
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")


def main() -> None:
    """`python benchmarks/_bench.py RESULT.json [COLUMN …]`: a saved `--json` table as markdown."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/_bench.py RESULT.json [COLUMN ...]")
    with open(sys.argv[1]) as handle:
        rows = json.load(handle)
    columns = sys.argv[2:] or [key for key in rows[0] if key != "load_average"]
    print_table(sys.argv[1], rows, columns, as_json=False)


if __name__ == "__main__":
    main()
