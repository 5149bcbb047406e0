"""Record stores keyed by a stable id: what a resumable run has finished, kept safe across kills.

* `JsonlRecords`: one append-only JSONL file, one record per line, each with its id under
  `id_field`. Appends are flushed and fsynced; a last line cut short by a kill (no final newline)
  is removed on open and its record simply run again, so a resume never repeats or loses a row. A
  malformed line elsewhere, or an id stored twice, is an error naming the line.
* `JsonFileRecords`: one JSON file per record (`<folder>/<id>.json`), written atomically (temp
  file + rename): the layout of the comparison's `methods/<name>.json`.

Both answer `get(id)`, `put(id, record)`, `id in store` and `ids()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from finesteer.errors import FinesteerError
from finesteer.runs.files import write_json_atomic

Record = Mapping[str, Any]


class RecordError(FinesteerError, ValueError):
    """A record store that cannot be read or resumed (corrupt line, repeated id, bad id)."""


class RecordStore(Protocol):
    def get(self, record_id: str) -> Record | None: ...

    def put(self, record_id: str, record: Record) -> None: ...

    def __contains__(self, record_id: object) -> bool: ...

    def ids(self) -> list[str]: ...


def check_id(record_id: str) -> str:
    """Ids name files and JSON keys: non-empty, no '/', not starting with '.'."""
    if not isinstance(record_id, str) or not record_id or "/" in record_id or record_id.startswith("."):
        raise RecordError(f"record id {record_id!r} cannot name a record")
    return record_id


def read_jsonl(path: str | Path, *, repair: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every complete line; a last line without its newline is dropped
    (and, with `repair`, cut from the file so the next append starts on a clean line)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data) and repair:
        with path.open("r+b") as handle:
            handle.truncate(complete)
    rows = []
    for line_no, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"{path}, line {line_no}: not valid JSON ({exc.msg}); fix or delete it"
            raise RecordError(message) from exc
        rows.append((line_no, row))
    return rows


class JsonlRecords:
    """Append-only JSONL records keyed by `record[id_field]` (see the module doc).

    `validate(line_no, row)` may raise for rows that are not records of this store.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        id_field: str = "id",
        validate: Callable[[int, Any], None] | None = None,
        error: type[Exception] = RecordError,
    ) -> None:
        self.path = Path(path)
        self.id_field = id_field
        self._error = error
        self._rows: dict[str, dict[str, Any]] = {}
        try:
            rows = read_jsonl(self.path)
        except RecordError as exc:
            raise error(str(exc)) from exc
        for line_no, row in rows:
            if validate is not None:
                validate(line_no, row)
            if not isinstance(row, dict) or id_field not in row:
                raise error(f"{self.path}, line {line_no}: not a record (needs {id_field!r})")
            key = str(row[id_field])
            if key in self._rows:
                raise error(f"{self.path}: id {row[id_field]!r} appears twice (row {line_no})")
            self._rows[key] = row

    def __contains__(self, record_id: object) -> bool:
        return str(record_id) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows.values())

    def ids(self) -> list[str]:
        return list(self._rows)

    def get(self, record_id: str) -> dict[str, Any] | None:
        return self._rows.get(str(record_id))

    def put(self, record_id: str, record: Record) -> None:
        row = dict(record)
        if str(row.setdefault(self.id_field, record_id)) != str(record_id):
            raise self._error(f"record {record_id!r} carries another id {row[self.id_field]!r}")
        self.extend([row])

    def extend(self, rows: Iterable[Record]) -> None:
        """Append rows (each with its id) in one flushed, fsynced write; stored ids are refused."""
        rows = [dict(r) for r in rows]
        for row in rows:
            key = str(row[self.id_field])
            if key in self._rows:
                raise self._error(f"{self.path}: id {key!r} is already stored")
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for row in rows:
            self._rows[str(row[self.id_field])] = row


class JsonFileRecords:
    """One JSON file per record, `<folder>/<id>.json`, written atomically (see the module doc)."""

    def __init__(self, folder: str | Path, *, indent: int = 1) -> None:
        self.folder = Path(folder)
        self.indent = indent

    def path(self, record_id: str) -> Path:
        return self.folder / f"{check_id(record_id)}.json"

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and self.path(record_id).is_file()

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []

    def get(self, record_id: str) -> dict[str, Any] | None:
        path = self.path(record_id)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc.msg}); delete it to run it again") from exc

    def put(self, record_id: str, record: Record) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(record_id), dict(record), indent=self.indent)


__all__ = [
    "JsonFileRecords",
    "JsonlRecords",
    "Record",
    "RecordError",
    "RecordStore",
    "check_id",
    "read_jsonl",
]
