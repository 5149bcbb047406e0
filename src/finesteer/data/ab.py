"""A/B items by catalog name or file path, always as `list[ABItem]`.

`load_dataset` returns the union `list[Item]` because a name may hold prompts or open-ended
questions; code that needs multiple-choice items calls `load_ab_items` instead and gets either
A/B items or a `DatasetError` saying what the name holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from finesteer.data.catalog import CATALOG, list_datasets, load_dataset
from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem

_KIND_NAMES = {"PromptItem": "prompt", "OpenEndedItem": "open-ended"}


def load_ab_items(
    name_or_path: str | os.PathLike[str],
    split: str | None = None,
    limit: int | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    exclude_origins: Iterable[str] | str = (),
    origins: Iterable[str] | str | None = None,
) -> list[ABItem]:
    """Load A/B items from a catalog behaviour (`split=None`: its default split) or a user file.

    A path is read as an A/B file (`columns` maps item fields to its columns, as in
    `read_ab_items`); a catalog name whose split holds other rows raises `DatasetError` naming
    the A/B datasets.
    """
    in_catalog = isinstance(name_or_path, str) and name_or_path in CATALOG
    items = load_dataset(
        name_or_path,
        split,
        limit,
        exclude_origins=exclude_origins,
        origins=origins,
        kind=None if in_catalog else "ab",
        columns=columns,
    )
    wrong = next((item for item in items if not isinstance(item, ABItem)), None)
    if wrong is not None:
        what = _KIND_NAMES.get(type(wrong).__name__, type(wrong).__name__)
        ab_names = sorted(info.name for info in list_datasets() if info.kind == "ab")
        where = f"dataset {name_or_path!r}" + (f" split {split!r}" if split is not None else "")
        raise DatasetError(
            f"{where} holds {what} rows, not A/B items; A/B datasets: {', '.join(ab_names)}"
        )
    return [item for item in items if isinstance(item, ABItem)]
