"""Extra A/B test sets (`--eval-data FILE`, recipe field `eval_data`): does an edit generalise beyond
the behaviour's own test split?

Each file is in the Anthropic evals JSONL format: one object per line with `question` (the options
written into it), `answer_matching_behavior` and `answer_not_matching_behavior` ("(A)", " (B)", …).
`load_eval_sets` reads and validates every file completely before any model is loaded (the parsing
is `finesteer.data.loaders.read_ab_items`: an error names the file, the line and the field);
`score_eval_sets` scores each set with the same A/B evaluation as the main test split, one row per
set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesteer.data.balance import letter_balanced
from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem
from finesteer.data.loaders import read_ab_items
from finesteer.evaluate.ab import ab_matching_rate_prob
from finesteer.evaluate.ab_effect import ab_rates
from finesteer.interventions.edit import Intervention
from finesteer.models.loading import LoadedModel
from finesteer.scoring.ab import ABPrompt

__all__ = ["EVAL_COLUMNS", "EvalSet", "load_eval_sets", "prob_row", "score_eval_sets"]

#: The Anthropic evals field names, required as written (no other column is taken for them).
EVAL_COLUMNS = {
    "question": "question",
    "matching": "answer_matching_behavior",
    "not_matching": "answer_not_matching_behavior",
}


@dataclass(frozen=True)
class EvalSet:
    """One extra test set: a unique `name` (the file's stem), its path and its validated items."""

    name: str
    path: str
    items: tuple[ABItem, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "n": len(self.items)}


def load_eval_sets(paths: Sequence[str | Path], *, balanced: bool = False) -> list[EvalSet]:
    """Every file read and validated (`DatasetError` naming file, line and field); with `balanced`
    each item is followed by its option-swapped mirror, as for the main test split."""
    sets: list[EvalSet] = []
    names: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() != ".jsonl":
            raise DatasetError(
                f"{path}: --eval-data takes Anthropic evals JSONL files (.jsonl), one A/B item per line"
            )
        if not path.is_file():
            raise DatasetError(f"eval data file not found: {path}")
        items = read_ab_items(path, columns=EVAL_COLUMNS)
        if balanced:
            items = letter_balanced(items, strict=False)
        name, n = path.stem, 2
        while name in names:
            name, n = f"{path.stem}-{n}", n + 1
        names.add(name)
        sets.append(EvalSet(name, str(path), tuple(items)))
    return sets


def score_eval_sets(
    lm: LoadedModel,
    sets: Sequence[EvalSet],
    intervention: Intervention | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """One row per set: its name, path, n and `ab_rates(lm, items, intervention, **settings)`."""
    return [{**s.to_dict(), **ab_rates(lm, list(s.items), intervention, **settings)} for s in sets]


def prob_row(
    lm: LoadedModel,
    eval_set: EvalSet,
    intervention: Intervention | None = None,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """One set's row in a comparison: the letter-probability matching rate (Wilson interval) and mean
    p(matching), as `compare` reports them for the main test split."""
    prob = ab_matching_rate_prob(
        lm, eval_set.items, prompt=ABPrompt(system), intervention=intervention, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    return {
        **eval_set.to_dict(),
        "ab_matching_rate": prob.matching_rate,
        "ab_mean_p_matching": prob.mean_p_matching,
        "ab_ci95": list(prob.interval()),
    }
