"""The record stores and the resumable runner: a resume never repeats or loses a row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finesteer.runs.records import JsonFileRecords, JsonlRecords, RecordError
from finesteer.runs.runner import Job, run_jobs


def _jobs(ids: list[str], calls: list[str], fail_at: str | None = None) -> list[Job]:
    def make(i: str) -> Job:
        def run() -> dict[str, object]:
            if i == fail_at:
                raise KeyboardInterrupt  # a kill between jobs
            calls.append(i)
            return {"value": int(i[1:]) ** 2}

        return Job(i, run)

    return [make(i) for i in ids]


@pytest.mark.parametrize("kind", ["jsonl", "files"])
def test_resume_never_repeats_or_loses_a_row(tmp_path: Path, kind: str) -> None:
    def store() -> JsonlRecords | JsonFileRecords:
        return JsonlRecords(tmp_path / "r.jsonl") if kind == "jsonl" else JsonFileRecords(tmp_path / "r")

    ids = [f"j{i}" for i in range(6)]
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_jobs(_jobs(ids, calls, fail_at="j3"), store())
    assert calls == ["j0", "j1", "j2"]
    calls.clear()
    seen: list[tuple[str, bool]] = []
    records = run_jobs(_jobs(ids, calls), store(), on_done=lambda i, r, resumed: seen.append((i, resumed)))
    assert calls == ["j3", "j4", "j5"]  # only the rest ran
    assert [r["value"] for r in records.values()] == [i * i for i in range(6)]
    assert seen == [(i, i in ("j0", "j1", "j2")) for i in ids]
    calls.clear()
    again = run_jobs(_jobs(ids, calls), store())
    assert calls == [] and [r["value"] for r in again.values()] == [i * i for i in range(6)]
    if kind == "jsonl":
        lines = (tmp_path / "r.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["id"] for x in lines) == ids  # each row exactly once


def test_truncated_last_line_is_dropped_and_run_again(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    calls: list[str] = []
    run_jobs(_jobs(["j0", "j1", "j2"], calls), JsonlRecords(path))
    text = path.read_text()
    path.write_text(text[: len(text) - 7])  # a kill in the middle of writing j2's line
    calls.clear()
    records = run_jobs(_jobs(["j0", "j1", "j2", "j3"], calls), JsonlRecords(path))
    assert calls == ["j2", "j3"] and [r["value"] for r in records.values()] == [0, 1, 4, 9]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["j0", "j1", "j2", "j3"]


def test_corrupt_or_repeated_rows_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RecordError, match="line 2: not valid JSON"):
        JsonlRecords(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(RecordError, match="appears twice"):
        JsonlRecords(path)
    path.write_text('{"id": "a"}\n')
    store = JsonlRecords(path)
    with pytest.raises(RecordError, match="already stored"):
        store.put("a", {"x": 1})
    with pytest.raises(RecordError, match="unique"):
        run_jobs(_jobs(["j1", "j1"], []), None)
    with pytest.raises(RecordError, match="cannot name"):
        run_jobs(_jobs(["../x"], []), None)


def test_check_refuses_a_stale_record(tmp_path: Path) -> None:
    store = JsonFileRecords(tmp_path / "m")
    run_jobs([Job("a", lambda: {"key": 1})], store)
    assert json.loads((tmp_path / "m" / "a.json").read_text()) == {"key": 1}

    def check(saved: object) -> None:
        raise ValueError("made with other settings")

    with pytest.raises(ValueError, match="other settings"):
        run_jobs([Job("a", lambda: pytest.fail("must not run"), check)], store)
