"""`fit sta --data FILE --columns …`: a user's triples file is checked before the SAE or model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.methods.data import load_triples
from finesteer.methods.errors import MethodError


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_columns_map_a_users_triples(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "yes": f"refuse {i}", "no": f"comply {i}"} for i in range(3)]
    path = _write(tmp_path / "pairs.jsonl", rows)
    triples = load_triples(str(path), 2, {"question": "prompt", "matching": "yes", "not_matching": "no"})
    assert triples == [("q0", "refuse 0", "comply 0"), ("q1", "refuse 1", "comply 1")]


def test_a_bad_row_names_file_line_and_field(tmp_path: Path) -> None:
    rows = [{"question": "q", "matching": "a", "not_matching": "b"}, {"question": "q2", "matching": ""}]
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MethodError, match=r"bad.jsonl, line 2: missing or empty column 'matching'"):
        load_triples(str(path), 10)
    with pytest.raises(MethodError, match="unknown field"):
        load_triples(str(path), 10, {"prompt": "question"})


def test_fit_sta_refuses_a_bad_file_before_loading_anything(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"q": "x"}])
    result = CliRunner().invoke(
        app,
        ["fit", "sta", "tiny-llama", "--sae", str(tmp_path / "no-such-sae"), "--out", str(tmp_path / "a"),
         "--data", str(path), "--columns", "question=q"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "bad.jsonl, line 1: missing or empty column 'matching'" in result.output  # not the missing SAE
