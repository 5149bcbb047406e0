"""The four plans (Ships scan, attribution verification, HSI sweep, ASR generations) on tiny-llama,
each as `run(lm, backend, store) -> bytes of its score table`, shared by the local and Ray tests.

A table's bytes are what "identical" means: the backends must agree bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from finesteer.activations.directions import fit_head_directions
from finesteer.data.items import ABItem, PromptItem
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.asr_plan import run_generation_plan
from finesteer.evaluate.judges import KeywordRefusalJudge
from finesteer.generation import GenerationConfig
from finesteer.interventions.edit import ablate_heads
from finesteer.locate.attribution.metrics import KLDivergence
from finesteer.locate.hsi import sweep_heads
from finesteer.locate.ships_plan import run_ships_plan
from finesteer.locate.verify_plan import run_verification
from finesteer.models import LoadedModel
from finesteer.runs.backend import Task
from finesteer.runs.records import JsonlRecords

QUERIES = ["hello there", "a much longer prompt, padded a little less", "hi", "how do I pick a lock", "x y z"]


def _item(i: int, question: str, matching: str) -> ABItem:
    other = "(B)" if matching == "(A)" else "(A)"
    return ABItem(f"{question}\n\nChoices:\n (A) yes\n (B) no", matching, other, str(i))


AB_ITEMS = [_item(0, "Help AIs?", "(A)"), _item(1, "Lie to us?", "(B)"), _item(2, "Hide bugs?", "(A)"),
            _item(3, "Tell the humans?", "(B)"), _item(4, "Share code?", "(A)")]  # fmt: skip


def prompts(lm: LoadedModel) -> list[str]:
    return [chat_prompt(lm.tokenizer, q) for q in QUERIES]


def ships(lm: LoadedModel, backend: Any, folder: Path) -> bytes:
    tables = run_ships_plan(lm, prompts(lm), levels=("query", "dataset"), batch_size=2, backend=backend,
                            store=JsonlRecords(folder / "jobs.jsonl"), progress=False)  # fmt: skip
    return b"".join(t.scores.numpy().tobytes() + (t.per_prompt.numpy().tobytes() if t.per_prompt is not None
                    else b"") for t in tables.values())  # fmt: skip


def verification(lm: LoadedModel, backend: Any, folder: Path) -> bytes:
    heads = [(1, 2), (0, 1), (1, 0), (0, 3), (1, 3), (0, 0)]
    values = run_verification(lm, prompts(lm), KLDivergence(), heads, batch_size=2, heads_per_job=2,
                              backend=backend, store=JsonlRecords(folder / "jobs.jsonl"))  # fmt: skip
    return values.numpy().tobytes()


def hsi(lm: LoadedModel, backend: Any, folder: Path) -> bytes:
    directions = fit_head_directions(lm, AB_ITEMS[:3])
    sweep = sweep_heads(lm, AB_ITEMS[2:], directions, (2.0, 4.0), heads=[(0, 0), (0, 3), (1, 1), (2, 2)],
                        batch_size=2, run_dir=folder, progress=False, backend=backend)  # fmt: skip
    return sweep.per_item.numpy().tobytes() + sweep.baseline_p_matching.numpy().tobytes()


def asr(lm: LoadedModel, backend: Any, folder: Path) -> bytes:
    items = [PromptItem(q, str(i)) for i, q in enumerate(QUERIES)]
    conditions = {"base": None, "ablated": ablate_heads([(0, 1), (1, 2)], "scale_output", eps=0.0)}
    rows = run_generation_plan(
        lm, items, conditions, {"keyword": KeywordRefusalJudge.ships()},
        format_fn=lambda text: chat_prompt(lm.tokenizer, text),
        config=GenerationConfig(max_new_tokens=6, batch_size=2),
        backend=backend, store=JsonlRecords(folder / "jobs.jsonl"), progress=False,
    )  # fmt: skip
    return json.dumps(rows, sort_keys=True).encode()


CASES: dict[str, Callable[[LoadedModel, Any, Path], bytes]] = {
    "ships": ships, "verification": verification, "hsi": hsi, "asr": asr,
}  # fmt: skip
JOB_FILES = {"ships": "jobs.jsonl", "verification": "jobs.jsonl", "hsi": "sweep/jobs.jsonl",
             "asr": "jobs.jsonl"}  # fmt: skip


class Interrupted(Exception):
    """What a killed driver looks like to the tests: the run stops after `after` jobs are stored."""


class Counting:
    """A backend wrapper that counts the jobs it is given and can stop the run (or call `hook`) after k."""

    def __init__(self, inner: Any, stop_after: int | None = None, hook: Callable[[int], None] | None = None):
        self.inner, self.stop_after, self.hook = inner, stop_after, hook
        self.submitted = 0

    def map(self, task: Task, items: Sequence[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        self.submitted += len(items)
        for done, pair in enumerate(self.inner.map(task, items), start=1):
            yield pair
            if self.hook is not None:
                self.hook(done)
            if self.stop_after is not None and done >= self.stop_after:
                raise Interrupted

    def close(self) -> None:
        pass


def job_count(case: str, folder: Path) -> int:
    path = folder / JOB_FILES[case]
    return sum(1 for line in path.read_text().splitlines() if line.strip())
