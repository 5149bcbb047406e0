"""Load one split and check what kind of items it holds, so callers get one item type, not a union.

`load_dataset` returns a list of any item kind; a stage that needs A/B items (HSI, ITI, `eval ab`)
or plain prompts (Ships, ASR) checks the kind here once, with one message naming the dataset and
split, instead of `isinstance` checks at every caller. A name that is not in the catalogue is read
as a user file of the requested kind.
"""

from __future__ import annotations

from finesteer.data.catalog import CATALOG, load_dataset
from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem, Item


def _split_name(split: str | None) -> str:
    return split or "default"


def _load(name: str, split: str | None, limit: int | None, kind: str) -> list[Item]:
    file_kind = None if name in CATALOG else kind
    items = load_dataset(name, split, limit, kind=file_kind)  # type: ignore[arg-type]
    if not items:
        raise DatasetError(f"dataset {name!r} (split {_split_name(split)}) has no items")
    return items


def load_ab_set(name: str, split: str | None = None, limit: int | None = None) -> list[ABItem]:
    """The A/B items of one split (catalogue name or a .jsonl/.json/.csv file of A/B rows)."""
    items = _load(name, split, limit, "ab")
    if not all(isinstance(item, ABItem) for item in items):
        raise DatasetError(
            f"dataset {name!r} split {_split_name(split)} is not an A/B set "
            "(this needs matching/not-matching answers)"
        )
    return [item for item in items if isinstance(item, ABItem)]


def load_prompt_set(name: str, split: str | None = None, limit: int | None = None) -> list[Item]:
    """The items of one split of prompts (harmful or harmless requests); A/B sets are refused."""
    items = _load(name, split, limit, "prompts")
    if any(isinstance(item, ABItem) for item in items):
        raise DatasetError(f"dataset {name!r} is an A/B set; use `finesteer eval ab` for it")
    return items


def load_queries(
    name: str, split: str | None = None, limit: int | None = None
) -> tuple[list[str], list[str]]:
    """(texts, ids) of a catalogue dataset's split; A/B or open-ended items contribute their question."""
    items = load_dataset(name, split=split, limit=limit)
    if not items:
        raise DatasetError(f"dataset {name!r} (split {split!r}) has no items")
    texts, ids = [], []
    for item in items:
        text = getattr(item, "prompt", None) or getattr(item, "question", None)
        if not text:
            raise DatasetError(f"dataset {name!r} items have no prompt/question text")
        texts.append(text)
        ids.append(str(item.id))
    return texts, ids
