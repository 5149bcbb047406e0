"""Shared helpers of the benchmark scripts: repeated timing, the load note, the table and its JSON."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

COLUMNS = ("method", "seconds", "speedup", "max_abs_diff", "top10_overlap")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any, list[float]]:
    """Median wall seconds of `repeats` calls of fn, the last call's result, and every time."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result, times


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
