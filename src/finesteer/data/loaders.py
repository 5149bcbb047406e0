"""Read JSONL / JSON / CSV files into typed rows, validating every row.

The same functions read the vendored datasets and a user's own files: a column mapping says which
column holds which field. A bad row stops loading with a `DatasetError` naming the file, the 1-based
line and the problem, because a silently skipped or mis-parsed row changes what a steering vector
or an attribution score means.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem, OpenEndedItem, PromptItem, option_letters

PathLike = str | os.PathLike[str]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv")

# Default column names per item field, tried in order (case-insensitively). A field the caller maps
# explicitly must exist; a required field must match one of these otherwise.
_AB_DEFAULTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "question": ("question",),
        "matching": ("answer_matching_behavior", "matching"),
        "not_matching": ("answer_not_matching_behavior", "not_matching"),
        "id": ("id", "data_id", "index"),
    }
)
_PROMPT_DEFAULTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "prompt": ("prompt", "instruction", "goal", "question", "text"),
        "id": ("id", "data_id", "index"),
        "category": ("category",),
        "source": ("source",),
        "label": ("label",),
        "target": ("target",),
    }
)
_OPEN_ENDED_DEFAULTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "question": ("question", "prompt"),
        "id": ("id", "data_id", "index"),
    }
)

# Per item kind: each field's default column names, and the fields a file must provide.
FIELD_COLUMNS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"ab": _AB_DEFAULTS, "prompts": _PROMPT_DEFAULTS, "open_ended": _OPEN_ENDED_DEFAULTS}
)
REQUIRED_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"ab": ("question", "matching", "not_matching"), "prompts": ("prompt",), "open_ended": ("question",)}
)

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One record of a data file with where it came from, for error messages."""

    path: Path
    line: int  # 1-based line in the file (JSON arrays: 1-based record number)
    values: Mapping[str, Any]
    columns: tuple[str, ...]  # column names in file order (CSV header, or the record's keys)

    @property
    def where(self) -> str:
        unit = "record" if self.path.suffix.lower() == ".json" else "line"
        return f"{self.path}, {unit} {self.line}"

    def error(self, problem: str) -> DatasetError:
        """A `DatasetError` for this row."""
        return DatasetError(f"{self.where}: {problem}")

    def find(self, column: str) -> str | None:
        """The actual column name matching `column` (exact first, then case-insensitive)."""
        if column in self.values:
            return column
        lowered = column.lower()
        for name in self.columns:
            if name.lower() == lowered:
                return name
        return None


def read_rows(path: PathLike) -> list[Row]:
    """Read every record of a `.jsonl`, `.json` (array of objects) or `.csv` file.

    Blank lines are skipped. Raises `FileNotFoundError` for a missing file and `DatasetError` for
    an unsupported suffix, undecodable text, a malformed record or a file with no records.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DatasetError(
            f"{file}: unsupported file type {suffix or '(no suffix)'!r}; use one of {SUPPORTED_SUFFIXES}"
        )
    if not file.is_file():
        raise FileNotFoundError(f"dataset file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{file}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".csv":
        rows = _read_csv(file, text)
    elif suffix == ".json":
        rows = _read_json_array(file, text)
    else:
        rows = _read_jsonl(file, text)
    if not rows:
        raise DatasetError(f"{file}: file is empty (no data rows)")
    return rows


def _read_jsonl(file: Path, text: str) -> list[Row]:
    lines = [(no, line) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return [_json_row(file, line_no, line) for line_no, line in lines]


def _json_row(file: Path, line_no: int, line: str) -> Row:
    """One JSONL line as a Row; an error names the file, the line and what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetError(f"{file}, line {line_no}: {problem}") from exc
    if not isinstance(record, dict):
        raise DatasetError(f"{file}, line {line_no}: expected a JSON object, got {type(record).__name__}")
    return Row(file, line_no, record, tuple(record))


def _read_json_array(file: Path, text: str) -> list[Row]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
        raise DatasetError(f"{file}, line {exc.lineno}: {problem}") from exc
    if not isinstance(records, list):
        raise DatasetError(f"{file}: expected a JSON array of objects, got {type(records).__name__}")
    rows: list[Row] = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise DatasetError(f"{file}, record {number}: expected a JSON object, got {kind}")
        rows.append(Row(file, number, record, tuple(record)))
    return rows


def _read_csv(file: Path, text: str) -> list[Row]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DatasetError(f"{file}, line 1: malformed CSV header ({exc})") from exc
    columns = tuple(header)
    rows: list[Row] = []
    start = reader.line_num + 1  # a quoted field may span lines: report the line the row starts on
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"{file}, line {start}: malformed CSV ({exc})") from exc
        line_no, start = start, reader.line_num + 1
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(columns):
            raise DatasetError(
                f"{file}, line {line_no}: row has {len(fields)} fields but the header has {len(columns)} "
                f"({', '.join(repr(c) for c in columns)})"
            )
        rows.append(Row(file, line_no, dict(zip(columns, fields, strict=True)), columns))
    return rows


def _resolve_columns(
    rows: list[Row],
    defaults: Mapping[str, tuple[str, ...]],
    mapping: Mapping[str, str] | None,
    required: Iterable[str],
) -> dict[str, str | None]:
    """Decide, from the first row's columns, which column feeds each item field."""
    mapping = {_field_name(key, defaults): column for key, column in (mapping or {}).items()}
    unknown = sorted(set(mapping) - set(defaults))
    if unknown:
        raise DatasetError(
            f"{rows[0].path}: unknown field(s) {unknown} in the column mapping; fields are {sorted(defaults)}"
        )
    first = rows[0]
    resolved: dict[str, str | None] = {}
    for field_name, candidates in defaults.items():
        if field_name in mapping:
            actual = first.find(mapping[field_name])
            if actual is None:
                raise first.error(
                    f"missing column {mapping[field_name]!r} (mapped to {field_name!r}); "
                    f"columns are {list(first.columns)}"
                )
            resolved[field_name] = actual
            continue
        actual = next((found for c in candidates if (found := first.find(c)) is not None), None)
        if actual is None and field_name in required:
            raise first.error(
                f"missing column for {field_name!r} (looked for {list(candidates)}; columns are "
                f"{list(first.columns)}); map it with --columns {field_name}=<column> (columns= in Python)"
            )
        resolved[field_name] = actual
    return resolved


def _field_name(key: str, defaults: Mapping[str, tuple[str, ...]]) -> str:
    """A mapping key as its field: a field name, or one of its default column names
    ('answer_matching_behavior' → 'matching'), matched case-insensitively; unknown keys stay."""
    lowered = key.lower()
    for field_name, candidates in defaults.items():
        if lowered == field_name.lower() or lowered in (c.lower() for c in candidates):
            return field_name
    return key


def _text(row: Row, column: str, field_name: str) -> str:
    """A required, non-empty string value."""
    actual = row.find(column)
    if actual is None:
        raise row.error(f"missing column {column!r} ({field_name})")
    value = row.values[actual]
    if value is None:
        raise row.error(f"column {actual!r} ({field_name}) is null")
    if not isinstance(value, str):
        raise row.error(f"column {actual!r} ({field_name}) must be a string, got {type(value).__name__}")
    if not value.strip():
        raise row.error(f"column {actual!r} ({field_name}) is empty")
    return value


def _optional(row: Row, column: str | None) -> str | None:
    """An optional value as a string; missing, null or blank → None."""
    if column is None:
        return None
    actual = row.find(column)
    if actual is None:
        return None
    value = row.values[actual]
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise row.error(f"column {actual!r} must be a scalar, got {type(value).__name__}")
    text = str(value)
    return text if text.strip() else None


def _row_id(row: Row, column: str | None, index: int) -> str:
    value = _optional(row, column)
    return value if value is not None else str(index)


def _letter(row: Row, column: str, field_name: str) -> str:
    # Surrounding whitespace is dropped: the Anthropic originals write " (A)", CAA writes "(A)".
    value = _text(row, column, field_name).strip()
    if len(value) != 3 or value[0] != "(" or value[2] != ")" or not ("A" <= value[1] <= "Z"):
        raise row.error(f"{field_name} answer {value!r} is not of the form '(X)' with X a capital letter")
    return value


def _build(rows: list[Row], make: Callable[[Row, int], T], limit: int | None) -> list[T]:
    """Build items from every row (so the whole file is validated), then apply `limit`."""
    check_limit(limit)
    items: list[T] = []
    for index, row in enumerate(rows):
        try:
            items.append(make(row, index))
        except DatasetError:
            raise
        except ValueError as exc:  # an item's own validation: add the file and line
            raise row.error(str(exc)) from exc
    return items if limit is None else items[:limit]


def check_limit(limit: int | None) -> None:
    """Reject a negative or non-integer `limit` early, with a clear message."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")


def read_ab_items(
    path: PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    infer_not_matching: bool = False,
    limit: int | None = None,
) -> list[ABItem]:
    """Read multiple-choice items (question with choices, matching and not-matching answer letters).

    `columns` maps item fields (`question`, `matching`, `not_matching`, `id`) to the file's columns;
    unmapped fields use the CAA names (`question`, `answer_matching_behavior`,
    `answer_not_matching_behavior`). Answers must be "(X)"; surrounding spaces are dropped.
    With `infer_not_matching=True` a file that only gives the matching letter (e.g. HSI's `gt`) is
    accepted when the question has exactly two options: the other one is the contrast. Rows without
    an id column get their 0-based row index.
    """
    rows = read_rows(path)
    required = ("question", "matching") if infer_not_matching else ("question", "matching", "not_matching")
    cols = _resolve_columns(rows, _AB_DEFAULTS, columns, required)

    def make(row: Row, index: int) -> ABItem:
        question = _text(row, cols["question"] or "question", "question")
        matching = _letter(row, cols["matching"] or "matching", "matching")
        if cols["not_matching"] is not None:
            not_matching = _letter(row, cols["not_matching"], "not_matching")
        else:
            others = [o for o in option_letters(question) if f"({o})" != matching]
            if len(others) != 1:
                raise row.error(
                    f"cannot infer the not-matching answer: the question lists options "
                    f"{option_letters(question)} (need exactly two)"
                )
            not_matching = f"({others[0]})"
        return ABItem(question, matching, not_matching, _row_id(row, cols["id"], index))

    return _build(rows, make, limit)


def load_prompts(
    path: PathLike,
    column: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    source: str | None = None,
    limit: int | None = None,
) -> list[PromptItem]:
    """Read single prompts (harmful, harmless or over-refusal probes).

    `column` names the prompt column (default: the first of prompt/instruction/goal/question/text);
    `columns` maps the other fields (`id`, `category`, `source`, `label`, `target`). `source` fills
    `PromptItem.source` for rows without a source column. Columns not mapped to a field are kept in
    `PromptItem.extra`.
    """
    mapping = dict(columns or {})
    if column is not None:
        mapping["prompt"] = column
    rows = read_rows(path)
    cols = _resolve_columns(rows, _PROMPT_DEFAULTS, mapping, ("prompt",))
    used = {c for c in cols.values() if c is not None}

    def make(row: Row, index: int) -> PromptItem:
        extra = tuple(
            (name, value)
            for name in row.columns
            if name not in used and name and (value := _optional(row, name)) is not None
        )
        return PromptItem(
            prompt=_text(row, cols["prompt"] or "prompt", "prompt"),
            id=_row_id(row, cols["id"], index),
            category=_optional(row, cols["category"]),
            source=_optional(row, cols["source"]) or source,
            label=_optional(row, cols["label"]),
            target=_optional(row, cols["target"]),
            extra=extra,
        )

    return _build(rows, make, limit)


def load_open_ended(
    path: PathLike,
    column: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> list[OpenEndedItem]:
    """Read questions for free-generation evaluation (`column` defaults to `question`, then `prompt`)."""
    mapping = dict(columns or {})
    if column is not None:
        mapping["question"] = column
    rows = read_rows(path)
    cols = _resolve_columns(rows, _OPEN_ENDED_DEFAULTS, mapping, ("question",))

    def make(row: Row, index: int) -> OpenEndedItem:
        return OpenEndedItem(
            _text(row, cols["question"] or "question", "question"), _row_id(row, cols["id"], index)
        )

    return _build(rows, make, limit)
