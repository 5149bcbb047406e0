"""The data a method fits on: a behaviour's A/B splits, or contrast triples (the refusal task).

`BehaviourData` holds a CAA-style behaviour's train / val / test splits (what `finesteer compare`
fits and evaluates on); `ContrastData` holds (question, wanted answer, unwanted answer) triples and
the system prompt of a refusal-style experiment, with a cache so methods that share statistics
(STA, SAE-all, the answer-mean CAA) measure them once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.data.ab import load_ab_items
from finesteer.data.catalog import CATALOG, dataset_info, list_datasets, load_dataset
from finesteer.data.items import ABItem, OpenEndedItem, ab_triples
from finesteer.data.typed import load_ab_set
from finesteer.fit.refusal_pairs import refusal_triples
from finesteer.methods.errors import MethodError

if TYPE_CHECKING:
    from finesteer.sae.model import SparseAutoencoder

Triple = tuple[str, str, str]
"""(question, wanted answer, unwanted answer)."""


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourData:
    """The splits every method of a comparison uses for one behaviour.

    `train` / `val` divide the behaviour's `generate` split (seeded shuffle), `test_ab` and
    `open_ended` are its test splits. Methods fit on train, choose hyper-parameters on val; the
    comparison evaluates on the test splits only.
    """

    behaviour: str
    train: tuple[ABItem, ...]
    val: tuple[ABItem, ...]
    test_ab: tuple[ABItem, ...]
    open_ended: tuple[OpenEndedItem, ...] = ()
    seed: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val", "test_ab"):
            if not getattr(self, name):
                raise MethodError(f"behaviour data '{self.behaviour}': the {name} split is empty")
        # Ids restart at 0 in every split of the CAA files, so leakage is checked on the questions.
        train = {i.question for i in self.train}
        leaked = train & ({i.question for i in self.val} | {i.question for i in self.test_ab})
        if leaked:
            example = sorted(leaked)[0][:80]
            raise MethodError(
                f"{len(leaked)} question(s) are both in train and in val/test, e.g. {example!r}"
            )

    def summary(self) -> dict[str, Any]:
        def digest(items: Sequence[ABItem | OpenEndedItem]) -> str:
            text = json.dumps([(i.id, i.question) for i in items])
            return hashlib.sha256(text.encode()).hexdigest()[:12]

        return {
            "behaviour": self.behaviour,
            "seed": self.seed,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test_ab": len(self.test_ab),
            "n_open_ended": len(self.open_ended),
            "hashes": {
                "train": digest(self.train),
                "val": digest(self.val),
                "test_ab": digest(self.test_ab),
                "open_ended": digest(self.open_ended),
            },
            **dict(self.meta),
        }


def _catalogue_splits(behaviour: str) -> tuple[list[Any], list[Any], list[Any]]:
    """generate, test_ab and test_open_ended (empty when absent) of a catalogue behaviour."""
    splits = dataset_info(behaviour).splits
    missing = [s for s in ("generate", "test_ab") if s not in splits]
    if missing:
        raise MethodError(
            f"dataset '{behaviour}' has splits {list(splits)}; a comparison needs 'generate' (train/val) "
            f"and 'test_ab' (and optionally 'test_open_ended'); missing {missing}"
        )
    generate = list(load_dataset(behaviour, split="generate"))
    if not all(isinstance(i, ABItem) for i in generate):
        raise MethodError(f"dataset '{behaviour}': the generate split is not A/B items")
    test_ab = list(load_dataset(behaviour, split="test_ab"))
    open_ended = list(load_dataset(behaviour, split="test_open_ended")) if "test_open_ended" in splits else []
    return generate, test_ab, open_ended


def _limit(items: list[Any], limit: int | None, what: str) -> list[Any]:
    if limit is None:
        return items
    if limit < 1:
        raise MethodError(f"{what} limit must be ≥ 1, got {limit}")
    return items[:limit]


def load_behaviour_data(
    behaviour: str,
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    test_limit: int | None = None,
    open_ended_limit: int | None = None,
    seed: int = 0,
) -> BehaviourData:
    """Splits of a CAA-style behaviour dataset (`generate`, `test_ab`, `test_open_ended`).

    `generate` is shuffled with `seed` and its first `val_fraction` becomes val, the rest train;
    limits then keep the first N of each split (so a smaller run uses a subset of a larger one).
    A user file (a `.jsonl`/`.json`/`.csv` of A/B rows) is one split: a seeded `val_fraction` of it is
    held out as test_ab, the rest divided as `generate` is; it has no open-ended questions.
    """
    if not 0 < val_fraction < 1:
        raise MethodError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if behaviour in CATALOG:
        generate, test_ab, open_ended = _catalogue_splits(behaviour)
    else:  # a user file of A/B rows (`data.typed.check_data`): test_ab is held out of it, val-sized
        rows = load_ab_set(behaviour)
        random.Random(seed).shuffle(rows)
        n_test = max(1, round(val_fraction * len(rows)))
        generate, test_ab, open_ended = rows[n_test:], rows[:n_test], []
    order = list(range(len(generate)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(generate)))
    if n_val >= len(generate):
        raise MethodError(f"dataset '{behaviour}' has too few generate items ({len(generate)}) to split")
    val = [generate[i] for i in order[:n_val]]
    train = [generate[i] for i in order[n_val:]]
    return BehaviourData(
        behaviour=behaviour,
        train=tuple(_limit(train, train_limit, "train")),
        val=tuple(_limit(val, val_limit, "val")),
        test_ab=tuple(_limit(test_ab, test_limit, "test")),
        open_ended=tuple(_limit(open_ended, open_ended_limit, "open-ended")),
        seed=seed,
        meta={"val_fraction": val_fraction, "n_generate": len(generate)},
    )


@dataclass(frozen=True)
class ContrastData:
    """Contrast triples for answer-statistics methods (STA, SAE-all, answer-mean CAA) and prompting.

    `system_prompt` is the prompting baseline's text; `prompt_messages` are the user messages on
    which the system prompt is turned into vectors (`source="system_prompt"`). `sae` / `sae_path`
    name the SAE the experiment steers through (a method setting `sae` overrides them), and
    `stats_path` caches the answer statistics on disk. `cache` keeps statistics in memory so
    several methods fitted on the same data measure them once.
    """

    behaviour: str
    triples: tuple[Triple, ...]
    system_prompt: str | None = None
    prompt_messages: tuple[str, ...] = ()
    sae: SparseAutoencoder | None = field(default=None, repr=False, compare=False)
    sae_path: str | None = None
    stats_path: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.triples:
            raise MethodError(f"contrast data '{self.behaviour}': no triples")


def contrast_triples(data: BehaviourData | ContrastData) -> list[Triple]:
    """The triples a contrast method fits on: the A/B train items as open answers, or the triples."""
    if isinstance(data, ContrastData):
        return list(data.triples)
    return ab_triples(data.train)


def require_behaviour(method: str, data: BehaviourData | ContrastData) -> BehaviourData:
    """`data` as A/B behaviour splits, or an error saying the method needs them."""
    if not isinstance(data, BehaviourData):
        raise MethodError(
            f"method '{method}' fits on A/B behaviour splits (train/val), not on contrast triples"
        )
    return data


def load_triples(source: str, limit: int, columns: Mapping[str, str] | None = None) -> list[Triple]:
    """Up to `limit` (question, positive, negative) triples from `source`: "refusal-pairs" (built in),
    an A/B catalog behaviour (its answers as texts; the `generate` split where there is one), or a
    .jsonl / .json / .csv file with question, matching, not_matching columns (the STA authors' layout;
    `columns` maps those fields to the file's own column names)."""
    if source == "refusal-pairs":
        n_ab = limit // 5
        return refusal_triples(n_harmful=limit - n_ab, n_ab=n_ab)
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".csv", ".json") and path.exists():
        return _file_triples(path, limit, columns or {})
    if columns:
        raise MethodError("--columns applies to a --data file, not to a built-in set")
    known = {d.name: d for d in list_datasets() if d.kind == "ab"}
    if source not in known:
        raise MethodError(
            f"unknown --data {source!r}: use refusal-pairs, an A/B behaviour ({', '.join(sorted(known))}) "
            "or a .jsonl/.csv file with question, matching, not_matching"
        )
    split = "generate" if "generate" in known[source].splits else None
    return ab_triples(load_ab_items(source, split, limit=limit))


TRIPLE_FIELDS = ("question", "matching", "not_matching")


def _file_triples(path: Path, limit: int, columns: Mapping[str, str]) -> list[Triple]:
    """Every row checked (a missing or empty field names the file, line and field), then the first `limit`."""
    unknown = sorted(set(columns) - set(TRIPLE_FIELDS))
    if unknown:
        raise MethodError(f"--columns: unknown field(s) {unknown}; the fields are {', '.join(TRIPLE_FIELDS)}")
    names = [columns.get(f, f) for f in TRIPLE_FIELDS]
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        first_line = 2  # after the header
    else:
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = [json.loads(x) if x.strip() else None for x in text.splitlines()]
        except json.JSONDecodeError as exc:
            raise MethodError(f"{path}: not valid JSON ({exc})") from exc
        first_line = 1
    numbered = [(i + first_line, r) for i, r in enumerate(rows) if r is not None]
    if not numbered:
        raise MethodError(f"{path}: no rows; need {', '.join(TRIPLE_FIELDS)} columns")
    for line, row in numbered:
        for what, name in zip(TRIPLE_FIELDS, names, strict=True):
            value = row.get(name) if isinstance(row, Mapping) else None
            if not isinstance(value, str) or not value.strip():
                raise MethodError(f"{path}, line {line}: missing or empty column {name!r} ({what})")
    return [tuple(row[n] for n in names) for _, row in numbered[:limit]]  # type: ignore[misc]
