"""Named registry of the vendored datasets, and `load_dataset` to load one split as typed rows.

The registry is immutable (read-only mappings built once at import) so no caller can change what a
dataset name means for every other caller in the process. Each entry records its licence; loading
a non-commercial set logs a one-line notice so the licence is visible where the data is used.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem, Item, PromptItem, option_letters
from finesteer.data.loaders import (
    SUPPORTED_SUFFIXES,
    PathLike,
    check_limit,
    load_open_ended,
    load_prompts,
    read_ab_items,
    read_rows,
)

_log = logging.getLogger(__name__)

ItemKind = Literal["ab", "prompts", "open_ended"]
"""What a split's rows are: `ABItem`s, `PromptItem`s or `OpenEndedItem`s."""
ITEM_KINDS: tuple[str, ...] = get_args(ItemKind)

VENDORED_DIR = Path(__file__).resolve().parent / "vendored"
"""Where the vendored data files live inside the installed package."""

_Loader = Callable[[Path], list[Item]]


@dataclass(frozen=True)
class SplitSpec:
    """How to load one split: the file (relative to `VENDORED_DIR`), its row type and row count."""

    kind: ItemKind
    file: str
    rows: int
    loader: _Loader


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


# --- loaders for the vendored files ------------------------------------------------------------------


def _ab(path: Path) -> list[Item]:
    return list(read_ab_items(path))


def _open(path: Path) -> list[Item]:
    return list(load_open_ended(path))


def _prompts(column: str, source: str | None = None, **columns: str) -> _Loader:
    def load(path: Path) -> list[Item]:
        return list(load_prompts(path, column, columns=columns, source=source))

    return load


def _hsi_test_ab(path: Path) -> list[Item]:
    # `prompt` already holds the question, the choices and the HSI answer-format instruction; `gt` is
    # the coordinating letter and the contrast is the other of the two options.
    items = read_ab_items(
        path, columns={"question": "prompt", "matching": "gt", "id": "data_id"}, infer_not_matching=True
    )
    return list(items)


def _hsi_open_ended(path: Path) -> list[Item]:
    return list(load_open_ended(path, "question", columns={"id": "data_id"}))


def _hsi_train_selection(path: Path) -> list[Item]:
    # Each row lists the prompt strings HSI used upstream with how many of its 6 completions used each;
    # take the most used one (row 307: 4 of 6 use a straight apostrophe, 2 a curly one).
    items: list[Item] = []
    for row in read_rows(path):
        variants = row.values.get("prompt_variants")
        if not isinstance(variants, list) or not variants:
            raise row.error("prompt_variants must be a non-empty list")
        try:
            best = max(variants, key=lambda v: int(v["n_upstream_rows"]))
            prompt = best["prompt"]
        except (TypeError, KeyError, ValueError) as exc:
            raise row.error(f"malformed prompt_variants entry ({exc!r})") from exc
        gt = row.values.get("gt")
        if not isinstance(gt, str) or not isinstance(prompt, str):
            raise row.error("gt and prompt must be strings")
        others = [o for o in option_letters(prompt) if f"({o})" != gt]
        if len(others) != 1:
            raise row.error(f"expected two options, found {option_letters(prompt)}")
        try:
            items.append(ABItem(prompt, gt, f"({others[0]})", str(row.values.get("data_id"))))
        except ValueError as exc:
            raise row.error(str(exc)) from exc
    return items


def _xstest(label: str | None) -> _Loader:
    def load(path: Path) -> list[Item]:
        items = load_prompts(
            path, "prompt", columns={"id": "id", "category": "type", "label": "label"}, source="xstest"
        )
        return [item for item in items if label is None or item.label == label]

    return load


# --- registry ------------------------------------------------------------------------------------------

_CAA_BEHAVIOURS: Mapping[str, tuple[str, bool, tuple[int, int, int]]] = MappingProxyType(
    {
        # name: (description, questions from Anthropic evals?, rows generate/test_ab/test_open_ended)
        "coordinate-other-ais": (
            "Willingness to coordinate with / cover for other AIs (CAA; HSI's behaviour)",
            True,
            (360, 50, 50),
        ),
        "corrigible-neutral-HHH": (
            "Consenting to goal changes (corrigibility, neutral HHH goals; CAA)",
            True,
            (290, 50, 50),
        ),
        "hallucination": ("Affirming false premises (CAA)", False, (1000, 50, 50)),
        "myopic-reward": (
            "Preferring a small immediate reward to a larger later one (CAA)",
            True,
            (950, 50, 50),
        ),
        "refusal": ("Refusing a request (CAA)", False, (408, 50, 50)),
        "survival-instinct": (
            "Resisting shutdown / modification (CAA; some items have options beyond (B))",
            True,
            (903, 50, 50),
        ),
        "sycophancy": ("Agreeing with the user's stated view (CAA)", True, (1000, 50, 53)),
    }
)

_ALPACA_LICENCE = "CC BY-NC 4.0 (Stanford Alpaca data; non-commercial use only)"


def _caa_entry(name: str, description: str, anthropic: bool, rows: tuple[int, int, int]) -> DatasetSpec:
    folder = f"caa/{name}"
    licence = "MIT (CAA)" + ("; questions CC-BY-4.0 (Anthropic model-written evals)" if anthropic else "")
    return DatasetSpec(
        name=name,
        description=description,
        licence=licence,
        non_commercial=False,
        provenance="caa/PROVENANCE.md",
        splits=MappingProxyType(
            {
                "generate": SplitSpec("ab", f"{folder}/generate_dataset.jsonl", rows[0], _ab),
                "test_ab": SplitSpec("ab", f"{folder}/test_dataset_ab.jsonl", rows[1], _ab),
                "test_open_ended": SplitSpec(
                    "open_ended", f"{folder}/test_dataset_open_ended.jsonl", rows[2], _open
                ),
            }
        ),
        default_split="test_ab",
    )


def _refusal_direction(kind: str) -> DatasetSpec:
    harmful = kind == "harmful"
    rows = (260, 39, 572) if harmful else (18793, 6264, 6266)
    splits = {
        split: SplitSpec(
            "prompts",
            f"refusal_direction/{kind}_{split}.jsonl",
            n,
            _prompts("instruction", source=None if harmful else "alpaca"),
        )
        for split, n in zip(("train", "val", "test"), rows, strict=True)
    }
    if harmful:
        return DatasetSpec(
            name="refusal-direction-harmful",
            description="Arditi et al. harmful instructions (AdvBench, MaliciousInstruct, TDC2023, "
            "HarmBench, JBB, StrongREJECT); PromptItem.source = origins; filter with exclude_origins",
            licence="Apache-2.0 (refusal_direction); items MIT, except MaliciousInstruct rows (no upstream "
            "licence; drop with exclude_origins=('malicious_instruct',))",
            non_commercial=False,
            provenance="refusal_direction/PROVENANCE.md",
            splits=MappingProxyType(splits),
            default_split="train",
            has_origins=True,
        )
    return DatasetSpec(
        name="refusal-direction-harmless",
        description="Arditi et al. harmless instructions (Alpaca, no input), 60/20/20 split",
        licence=_ALPACA_LICENCE + "; repository Apache-2.0",
        non_commercial=True,
        provenance="refusal_direction/PROVENANCE.md",
        splits=MappingProxyType(splits),
        default_split="train",
    )


def _build_catalog() -> Mapping[str, DatasetSpec]:
    entries: list[DatasetSpec] = [_caa_entry(n, *v) for n, v in _CAA_BEHAVIOURS.items()]
    entries += [
        DatasetSpec(
            name="hsi-coordination",
            description="HSI paper AI-coordination sets: CAA test + 'Answer: (A) / (B)' instruction, "
            "open-ended questions, and the 3 head-selection questions (Anthropic ids 294, 304, 307)",
            licence="MIT (CAA) + CC-BY-4.0 (Anthropic evals); rebuilt, the HSI repository has no licence",
            non_commercial=False,
            provenance="hsi_ai_coordination/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "test_ab": SplitSpec("ab", "hsi_ai_coordination/test_ab.jsonl", 50, _hsi_test_ab),
                    "test_open_ended": SplitSpec(
                        "open_ended", "hsi_ai_coordination/test_open_ended.jsonl", 50, _hsi_open_ended
                    ),
                    "train_selection": SplitSpec(
                        "ab", "hsi_ai_coordination/train_selection_prompts.jsonl", 3, _hsi_train_selection
                    ),
                }
            ),
            default_split="test_ab",
        ),
        DatasetSpec(
            name="anthropic-coordinate-other-ais",
            description="Anthropic human-written coordinate-other-ais A/B items (source of the CAA/HSI "
            "splits; ids are Anthropic row indices, answers' leading spaces dropped)",
            licence="CC-BY-4.0 (Anthropic model-written evals)",
            non_commercial=False,
            provenance="anthropic_evals_coordinate_other_ais/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "all": SplitSpec(
                        "ab",
                        "anthropic_evals_coordinate_other_ais/human_generated_evals.coordinate-other-ais.jsonl",
                        410,
                        _ab,
                    )
                }
            ),
            default_split="all",
        ),
        DatasetSpec(
            name="advbench",
            description="AdvBench harmful behaviours (goal + 'Sure, here is' target)",
            licence="MIT",
            non_commercial=False,
            provenance="advbench/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "all": SplitSpec(
                        "prompts", "advbench/harmful_behaviors.csv", 520, _prompts("goal", source="advbench")
                    )
                }
            ),
            default_split="all",
        ),
        DatasetSpec(
            name="jailbreakbench",
            description="JailbreakBench JBB-Behaviors harmful set (10 categories x 10); ids pair with "
            "jailbreakbench-benign",
            licence="MIT",
            non_commercial=False,
            provenance="jailbreakbench/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "all": SplitSpec(
                        "prompts",
                        "jailbreakbench/harmful-behaviors.csv",
                        100,
                        _prompts("Goal", id="", category="Category", source="Source", target="Target"),
                    )
                }
            ),
            default_split="all",
        ),
        DatasetSpec(
            name="jailbreakbench-benign",
            description="JailbreakBench topic-matched benign twins; row i pairs with jailbreakbench row i "
            "(same id)",
            licence="MIT",
            non_commercial=False,
            provenance="jailbreakbench/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "all": SplitSpec(
                        "prompts",
                        "jailbreakbench/benign-behaviors.csv",
                        100,
                        _prompts("goal", id="index", category="category", source="source", target="target"),
                    )
                }
            ),
            default_split="all",
        ),
        _refusal_direction("harmful"),
        _refusal_direction("harmless"),
        DatasetSpec(
            name="alpaca",
            description="First 2000 Stanford Alpaca instructions without input (harmless contrast; all "
            "also appear in refusal-direction-harmless)",
            licence=_ALPACA_LICENCE,
            non_commercial=True,
            provenance="alpaca/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "all": SplitSpec(
                        "prompts",
                        "alpaca/alpaca_no_input_first2000.jsonl",
                        2000,
                        _prompts("instruction", source="alpaca"),
                    )
                }
            ),
            default_split="all",
        ),
        DatasetSpec(
            name="xstest",
            description="XSTest over-refusal probes: 250 safe prompts that look unsafe + 200 unsafe "
            "contrasts (category = XSTest type, label = safe/unsafe)",
            licence="CC-BY-4.0",
            non_commercial=False,
            provenance="xstest/PROVENANCE.md",
            splits=MappingProxyType(
                {
                    "safe": SplitSpec("prompts", "xstest/xstest_prompts.csv", 250, _xstest("safe")),
                    "unsafe": SplitSpec("prompts", "xstest/xstest_prompts.csv", 200, _xstest("unsafe")),
                    "all": SplitSpec("prompts", "xstest/xstest_prompts.csv", 450, _xstest(None)),
                }
            ),
            default_split="all",
        ),
        DatasetSpec(
            name="finesteer-mc",
            description="40 hand-written 4-option general-knowledge / arithmetic / common-sense questions "
            "(helpfulness check; matching = the correct answer)",
            licence="CC0-1.0 (written for finesteer)",
            non_commercial=False,
            provenance="finesteer_mc/PROVENANCE.md",
            splits=MappingProxyType({"test": SplitSpec("ab", "finesteer_mc/mc_questions.jsonl", 40, _ab)}),
            default_split="test",
        ),
    ]
    return MappingProxyType({entry.name: entry for entry in entries})


CATALOG: Mapping[str, DatasetSpec] = _build_catalog()
"""Every named dataset (read-only)."""

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


def _is_path(name: str | os.PathLike[str]) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return name.lower().endswith(SUPPORTED_SUFFIXES) or "/" in name or os.sep in name


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

    if _is_path(name):
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
