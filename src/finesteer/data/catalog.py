"""Named registry of the vendored datasets, and `load_dataset` to load one split as typed rows.

The registry is read from `catalog.yaml` (package data next to this module) and checked once at
import. It is immutable (read-only mappings) so no caller can change what a dataset name means for
every other caller in the process. Each entry records its licence; loading a non-commercial set
logs a one-line notice so the licence is visible where the data is used.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

import yaml

from finesteer.data.errors import DatasetError
from finesteer.data.items import Item, PromptItem
from finesteer.data.loaders import (
    SUPPORTED_SUFFIXES,
    PathLike,
    check_limit,
    load_open_ended,
    load_prompts,
    read_ab_items,
    read_rows,
)
from finesteer.data.vendored_loaders import LOADERS, Loader

_log = logging.getLogger(__name__)

ItemKind = Literal["ab", "prompts", "open_ended"]
"""What a split's rows are: `ABItem`s, `PromptItem`s or `OpenEndedItem`s."""
ITEM_KINDS: tuple[str, ...] = get_args(ItemKind)

VENDORED_DIR = Path(__file__).resolve().parent / "vendored"
"""Where the vendored data files live inside the installed package."""


@dataclass(frozen=True)
class SplitSpec:
    """How to load one split: the file (relative to `VENDORED_DIR`), its row type and row count."""

    kind: ItemKind
    file: str
    rows: int
    loader: Loader


@dataclass(frozen=True)
class DatasetSpec:
    """A catalog entry: splits, default split, licence and where its provenance is documented."""

    name: str
    description: str
    licence: str
    non_commercial: bool
    provenance: str  # PROVENANCE.md path relative to VENDORED_DIR
    splits: Mapping[str, SplitSpec]
    default_split: str
    has_origins: bool = False  # rows carry source datasets that `exclude_origins` / `origins` filter


@dataclass(frozen=True)
class DatasetInfo:
    """What `list_datasets` reports about one catalog entry."""

    name: str
    kind: ItemKind  # kind of the default split (A/B behaviours also have an open-ended split)
    splits: tuple[str, ...]
    rows: Mapping[str, int]
    default_split: str
    licence: str
    non_commercial: bool
    description: str
    provenance: Path


# --- registry (catalog.yaml) ------------------------------------------------------------------------------

CATALOG_FILE = Path(__file__).resolve().parent / "catalog.yaml"
"""The catalogue's source: one entry per dataset, in listing order."""

_DATASET_KEYS = frozenset(
    {
        "name",
        "description",
        "licence",
        "non_commercial",
        "provenance",
        "has_origins",
        "default_split",
        "splits",
    }
)
_SPLIT_KEYS = frozenset({"file", "kind", "rows", "loader", "options"})


def _mapping(where: str, value: object, keys: frozenset[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DatasetError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown, missing = sorted(set(value) - keys), sorted(keys - optional - set(value))
    if unknown or missing:
        raise DatasetError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    return value


def _text(where: str, entry: Mapping[str, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _flag(where: str, entry: Mapping[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise DatasetError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _split_spec(where: str, raw: object) -> SplitSpec:
    entry = _mapping(where, raw, _SPLIT_KEYS, {"options"})
    kind, loader, rows = _text(where, entry, "kind"), _text(where, entry, "loader"), entry["rows"]
    options = entry.get("options") or {}
    if kind not in ITEM_KINDS:
        raise DatasetError(f"{where}: kind must be one of {ITEM_KINDS}, got {kind!r}")
    if loader not in LOADERS:
        raise DatasetError(f"{where}: loader must be one of {sorted(LOADERS)}, got {loader!r}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise DatasetError(f"{where}: rows must be a row count, got {rows!r}")
    if not isinstance(options, Mapping):
        raise DatasetError(f"{where}: options must be a mapping, got {options!r}")
    try:
        load = LOADERS[loader](**options)
    except TypeError as exc:
        raise DatasetError(f"{where}: bad options for loader {loader!r}: {exc}") from exc
    return SplitSpec(cast(ItemKind, kind), _text(where, entry, "file"), rows, load)


def _dataset_spec(where: str, raw: object) -> DatasetSpec:
    entry = _mapping(where, raw, _DATASET_KEYS, {"has_origins"})
    name = _text(where, entry, "name")
    where = f"{where} ({name})"
    splits = entry["splits"]
    if not isinstance(splits, Mapping) or not splits:
        raise DatasetError(f"{where}: splits must be a non-empty mapping, got {splits!r}")
    specs = {str(s): _split_spec(f"{where}, split {s!r}", value) for s, value in splits.items()}
    default = _text(where, entry, "default_split")
    if default not in specs:
        raise DatasetError(f"{where}: default_split {default!r} is not one of its splits {list(specs)}")
    return DatasetSpec(
        name=name,
        description=_text(where, entry, "description"),
        licence=_text(where, entry, "licence"),
        non_commercial=_flag(where, entry, "non_commercial"),
        provenance=_text(where, entry, "provenance"),
        splits=MappingProxyType(specs),
        default_split=default,
        has_origins=_flag(where, entry, "has_origins"),
    )


def read_catalog(path: Path) -> Mapping[str, DatasetSpec]:
    """Read and check catalog.yaml: a read-only name -> DatasetSpec mapping in file order."""
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{path}: expected a non-empty list of datasets")
    catalog: dict[str, DatasetSpec] = {}
    for i, entry in enumerate(raw):
        spec = _dataset_spec(f"{path}: entry {i}", entry)
        if spec.name in catalog:
            raise DatasetError(f"{path}: dataset {spec.name!r} is listed twice")
        catalog[spec.name] = spec
    return MappingProxyType(catalog)


CATALOG: Mapping[str, DatasetSpec] = read_catalog(CATALOG_FILE)
"""Every named dataset (read-only), read from `CATALOG_FILE` once, at import."""


# --- origins (refusal-direction harmful rows) ----------------------------------------------------------

_ORIGINS_FILE = "refusal_direction/harmful_row_origins.csv"


def _origin_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_origins() -> dict[tuple[str, str], tuple[str, ...]]:
    """(split file stem, row index) → origin datasets, from harmful_row_origins.csv."""
    origins: dict[tuple[str, str], tuple[str, ...]] = {}
    for row in read_rows(VENDORED_DIR / _ORIGINS_FILE):
        try:
            split, index, names = (str(row.values[c]).strip() for c in ("split", "index", "origins"))
        except KeyError as exc:
            raise row.error(f"missing column {exc}") from exc
        if not names:
            raise row.error("origins is empty")
        origins[split, index] = tuple(n.strip() for n in names.split(";"))
    return origins


def _match_origins(requested: Iterable[str], known: set[str], argument: str) -> set[str]:
    """Map user-written origin names ("MaliciousInstruct", "harmbench") to known origin names."""
    matched: set[str] = set()
    for name in requested:
        key = _origin_key(name)
        hits = {k for k in known if key and _origin_key(k).startswith(key)}
        if not hits:
            raise DatasetError(f"{argument}: unknown origin {name!r}; known origins: {sorted(known)}")
        matched |= hits
    return matched


def _apply_origins(
    items: list[Item], split_file: str, exclude: tuple[str, ...], include: tuple[str, ...] | None
) -> list[Item]:
    """Fill PromptItem.source with the row's origins ("advbench;jailbreakbench") and apply the filters."""
    table = _read_origins()
    stem = Path(split_file).stem
    known = {o for names in table.values() for o in names}
    drop = _match_origins(exclude, known, "exclude_origins")
    keep = _match_origins(include, known, "origins") if include is not None else None
    kept: list[Item] = []
    for item in items:
        names = table.get((stem, item.id))
        if names is None or not isinstance(item, PromptItem):
            raise DatasetError(f"{VENDORED_DIR / _ORIGINS_FILE}: no origins for {stem} row {item.id}")
        if drop.intersection(names) or (keep is not None and not keep.intersection(names)):
            continue
        kept.append(replace(item, source=";".join(names)))
    return kept


# --- public API ----------------------------------------------------------------------------------------


def _unknown_name(name: str) -> DatasetError:
    close = difflib.get_close_matches(name, list(CATALOG), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return DatasetError(f"unknown dataset {name!r}.{hint} Available: {', '.join(CATALOG)}")


def _spec(name: str) -> DatasetSpec:
    spec = CATALOG.get(name)
    if spec is None:
        raise _unknown_name(name)
    return spec


def dataset_info(name: str) -> DatasetInfo:
    """Catalog facts about one dataset (splits, row counts, licence)."""
    spec = _spec(name)
    return DatasetInfo(
        name=spec.name,
        kind=spec.splits[spec.default_split].kind,
        splits=tuple(spec.splits),
        rows=MappingProxyType({s: split.rows for s, split in spec.splits.items()}),
        default_split=spec.default_split,
        licence=spec.licence,
        non_commercial=spec.non_commercial,
        description=spec.description,
        provenance=VENDORED_DIR / spec.provenance,
    )


def list_datasets() -> tuple[DatasetInfo, ...]:
    """All catalog entries, in catalog order."""
    return tuple(dataset_info(name) for name in CATALOG)


def is_user_file(name: str | os.PathLike[str]) -> bool:
    """Whether `name` means a user's file rather than a catalogue name (a path, a data-file suffix,
    or an existing file)."""
    if isinstance(name, os.PathLike):
        return True
    lowered = name.lower()
    return lowered.endswith(SUPPORTED_SUFFIXES) or "/" in name or os.sep in name or Path(name).is_file()


def _load_user_file(
    path: PathLike, kind: str | None, columns: Mapping[str, str] | None, limit: int | None
) -> list[Item]:
    if kind not in ITEM_KINDS:
        raise DatasetError(f"{path}: pass kind= one of {ITEM_KINDS} to load a user file (got {kind!r})")
    if kind == "ab":
        return list(read_ab_items(path, columns=columns, limit=limit))
    if kind == "open_ended":
        return list(load_open_ended(path, columns=columns, limit=limit))
    return list(load_prompts(path, columns=columns, limit=limit))


def load_dataset(
    name: str | os.PathLike[str],
    split: str | None = None,
    limit: int | None = None,
    *,
    exclude_origins: Iterable[str] | str = (),
    origins: Iterable[str] | str | None = None,
    kind: ItemKind | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Item]:
    """Load one split of a catalog dataset (or a user file) as typed rows.

    `split=None` uses the dataset's default split (A/B behaviours: `test_ab`). `limit` keeps the
    first rows after filtering. For `refusal-direction-harmful`, `exclude_origins` drops rows from
    the named source datasets and `origins` keeps only rows from them (names are matched loosely:
    "MaliciousInstruct" = "malicious_instruct", "harmbench" = harmbench_val + harmbench_test).

    `name` may instead be a path to a `.jsonl`/`.json`/`.csv` file; then `kind` ("ab", "prompts",
    "open_ended") is required and `columns` maps item fields to the file's columns.
    """
    check_limit(limit)
    exclude = (exclude_origins,) if isinstance(exclude_origins, str) else tuple(exclude_origins)
    include = (origins,) if isinstance(origins, str) else (tuple(origins) if origins is not None else None)

    if name not in CATALOG and is_user_file(name):
        if split is not None or exclude or include is not None:
            raise DatasetError(f"{name}: split and origin filters apply to catalog datasets, not user files")
        return _load_user_file(name, kind, columns, limit)
    spec = _spec(str(name))
    if kind is not None or columns is not None:
        raise DatasetError(f"{name}: kind= and columns= are for user files, not catalog datasets")

    split_name = spec.default_split if split is None else split
    split_spec = spec.splits.get(split_name)
    if split_spec is None:
        raise DatasetError(f"dataset {name!r} has no split {split_name!r}; splits: {', '.join(spec.splits)}")
    if (exclude or include is not None) and not spec.has_origins:
        with_origins = [s.name for s in CATALOG.values() if s.has_origins]
        raise DatasetError(f"dataset {name!r} has no origin metadata; origin filters work for {with_origins}")

    if spec.non_commercial:
        _log.warning(
            "finesteer: dataset %r is NON-COMMERCIAL data, licence: %s; see %s",
            name,
            spec.licence,
            VENDORED_DIR / spec.provenance,
        )
    items = split_spec.loader(VENDORED_DIR / split_spec.file)
    if spec.has_origins:
        items = _apply_origins(items, split_spec.file, exclude, include)
    return items if limit is None else items[:limit]
